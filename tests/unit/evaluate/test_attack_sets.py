"""Real typographic attack sets laid out as PAINT and RTA-100 are: label=<true>_text=<written>.png."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from po_cluster import cli
from po_cluster.data import world
from po_cluster.data.images import Geometry
from po_cluster.data.pairs import DataError
from po_cluster.data.records import ImageSet
from po_cluster.evaluate.attack_sets import evaluate_attack_set, parse_attack_name, read_attack_set, score
from po_cluster.evaluate.metrics import Evaluator
from po_cluster.model.aligned import AlignedCLIP
from po_cluster.model.spectral import SpectralLayer

VOCAB = ("car", "cat", "dog", "teddy bear")


class RedChannelReader(nn.Module):
    """A model with known answers: it predicts the class whose VOCAB index is the image's red value."""

    project = AlignedCLIP.project
    logprobs = AlignedCLIP.logprobs

    def __init__(self) -> None:
        super().__init__()
        self.spectral = SpectralLayer(len(VOCAB))
        self.logit_scale = 100.0
        self.reference: dict[str, torch.Tensor] = {}  # nothing trained: t moves only W

    def pixels(self, images, device: torch.device | None = None) -> torch.Tensor:
        return torch.as_tensor(np.asarray(images), device=device).float()

    def tokens(self, prompts: list[str]) -> torch.Tensor:
        return torch.tensor([VOCAB.index(p.removeprefix("a photo of a ").removesuffix(".")) for p in prompts])

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.one_hot(tokens, len(VOCAB)).float()

    def tower_at(self, t: float) -> None:
        return None  # no tower: encode_image reads the pixels

    def encode_image(self, pixels: torch.Tensor, t: float = 1.0, tower=None) -> torch.Tensor:
        return F.one_hot(pixels[:, 0, 0, 0].long(), len(VOCAB)).float()


def _tile(path, red: int, size=(16, 16)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (red, 50, 50)).save(path)


def test_names_parse_as_the_real_sets_name_them():
    assert parse_attack_name("label=dog_text=cat.png") == ("dog", "cat")
    assert parse_attack_name("ours/data/label=teddy_bear_text=ice cream.jpg") == ("teddy bear", "ice cream")
    assert parse_attack_name("label=dog_text=cat_12.JPG") == ("dog", "cat")  # duplicate counter
    for bad in ("dog_cat.png", "label=dog.png", "text=cat_label=dog.png"):
        with pytest.raises(DataError, match="not named label="):
            parse_attack_name(bad)


def test_rta100_style_folder_is_scored_with_known_answers(tmp_path):
    root = tmp_path / "rta100" / "ours" / "data"
    _tile(root / "label=dog_text=cat.png", VOCAB.index("dog"))  # reads the object: correct
    _tile(root / "label=cat_text=dog.png", VOCAB.index("dog"))  # reads the text: attack succeeds
    _tile(root / "label=teddy_bear_text=car_2.png", VOCAB.index("car"), (30, 16))  # attack succeeds
    _tile(root / "label=car_text=cat.png", VOCAB.index("dog"))  # neither
    (root / "README.txt").write_text("not an image, ignored")
    attack_set = read_attack_set(str(tmp_path / "rta100"), Geometry(16))
    assert attack_set.images.classnames == VOCAB  # union of labels and texts, sorted
    result = evaluate_attack_set(RedChannelReader(), attack_set)
    assert result.metrics == {"accuracy": 0.25, "attack_success": 0.5, "n": 4.0}
    predicted = {row["file"].rsplit("/", 1)[-1]: row["predicted"] for row in result.rows}
    assert predicted == {"label=car_text=cat.png": "dog", "label=cat_text=dog.png": "dog",
                         "label=dog_text=cat.png": "dog", "label=teddy_bear_text=car_2.png": "car"}
    _tile(root / "photo.png", 0)
    with pytest.raises(DataError, match=r"photo.png: not named label="):
        read_attack_set(str(tmp_path / "rta100"), Geometry(16))


def test_score_on_crafted_logprobs():
    logps = torch.log_softmax(torch.tensor([[3.0, 0, 0], [0, 3.0, 0], [0, 0, 3.0], [0, 3.0, 0]]), -1)
    labels, written = np.array([0, 0, 2, 2]), np.array([1, 1, 0, 1])
    assert score(logps, labels, written) == {"accuracy": 0.5, "attack_success": 0.5, "n": 4.0}


def test_agrees_with_the_evaluator_on_the_shipped_base(tmp_path, base_model, capsys):
    attacked = world.image_set("attacked", 48, seed=5)
    names = world.SHAPES
    for i, (image, label, text) in enumerate(zip(attacked.images, attacked.labels, attacked.written, strict=True)):
        Image.fromarray(image).save(tmp_path / f"label={names[label]}_text={names[text]}_{i}.png")
    attack_set = read_attack_set(str(tmp_path), base_model.preprocess.geometry)
    assert set(attack_set.images.classnames) == set(names)  # every shape occurs, so candidates match
    # rows are sorted by file name; put the evaluator's set in the same order
    order = np.array([int(f.rsplit("_", 1)[1].split(".")[0]) for f in attack_set.files])
    same = ImageSet(attacked.images[order], attacked.labels[order], attacked.written[order], names)
    assert np.array_equal(attack_set.images.images, same.images)  # PNG round trip is lossless
    expected = Evaluator.build(base_model, {"clean": same, "attacked": same}).metrics(1.0)
    result = evaluate_attack_set(base_model, attack_set, t=1.0)
    assert result.metrics["accuracy"] == pytest.approx(expected["attacked"])
    assert result.metrics["attack_success"] == pytest.approx(expected["attack_success"])
    assert result.metrics["attack_success"] > 0.3  # the base model reads, as CLIP does
    assert cli.main(["evaluate-attack-set", str(tmp_path), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["accuracy"] == pytest.approx(expected["attacked"])
