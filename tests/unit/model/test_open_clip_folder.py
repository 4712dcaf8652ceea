"""`po-cluster export --format open_clip`: the folder open_clip loads as local-dir:, in a fresh interpreter
where po_cluster cannot be imported, gives po-cluster's embeddings at t and applies the model's own
preprocessing (for the shipped base and for a LoRA release with its own)."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from po_cluster import cli
from po_cluster.config import SHIPPED_BASE, LoraConfig, ModelConfig, PreprocessConfig
from po_cluster.data import world
from po_cluster.data.images import decode, to_pixels
from po_cluster.model.aligned import AlignedCLIP
from po_cluster.model.checkpoint import model_description, save_checkpoint
from po_cluster.model.export import CONFIG_JSON, ExportError, export_open_clip_folder
from po_cluster.model.loading import load_clip
from po_cluster.model.lora import adapters
from po_cluster.model.targets import open_target
from po_cluster.store.artifacts import open_store

TOLERANCE = 1e-5
PROMPTS = ["a photo of a circle.", "a photo of a star.", "a red hexagon"]

# What a user without po-cluster runs: stock open_clip on the folder, images through its own preprocess.
STOCK = textwrap.dedent("""
    import json, sys
    sys.modules["po_cluster"] = None  # po_cluster cannot be imported here
    try:
        import po_cluster
    except ImportError:
        pass
    else:
        raise SystemExit("po_cluster is importable")
    import open_clip, torch
    from PIL import Image
    folder, out, *images = sys.argv[1:]
    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + folder)
    tokenizer = open_clip.get_tokenizer("local-dir:" + folder)
    model.eval()
    prompts = json.load(open(folder + "/open_clip_config.json"))["po_cluster"]["classnames"][:2] + ["a red hexagon"]
    with torch.no_grad():
        image = model.encode_image(torch.stack([preprocess(Image.open(p).convert("RGB")) for p in images]),
                                   normalize=True)
        text = model.encode_text(tokenizer(prompts), normalize=True)
    loaded = sorted(m for m, v in sys.modules.items() if m.startswith("po_cluster") and v is not None)
    torch.save({"image": image, "text": text, "prompts": prompts, "modules": loaded}, out)
""")


def _images(folder) -> list[str]:
    """Files of other sizes than the model's, so that its resize mode and crop matter."""
    rng = np.random.default_rng(3)
    paths = []
    for i, (height, width) in enumerate([(90, 60), (64, 120), (33, 47)]):
        image = world.image_set("attacked", 1, seed=i).images[0]
        noisy = np.clip(np.asarray(Image.fromarray(image).resize((width, height))) + rng.integers(-20, 20, (height,
                        width, 3)), 0, 255).astype(np.uint8)
        path = folder / f"{i}.png"
        Image.fromarray(noisy).save(path)
        paths.append(str(path))
    return paths


def _stock(tmp_path, folder, images) -> dict:
    out = tmp_path / "stock.pt"
    run = subprocess.run([sys.executable, "-c", STOCK, str(folder), str(out), *images], cwd=tmp_path,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    return torch.load(out)


@torch.no_grad()
def _ours(model: AlignedCLIP, images: list[str], prompts: list[str], t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """po-cluster's aligned embeddings at t: files decoded by the image path, the model's own preprocessing."""
    pixels = [to_pixels(decode(Path(p).read_bytes())) for p in images]
    image = torch.cat([model.project(model.encode_image(model.pixels(p[None]), t), t) for p in pixels])
    return image, model.project(model.encode_text(model.tokens(prompts)), t)


def _compare(stock: dict, ours: tuple[torch.Tensor, torch.Tensor]) -> float:
    assert stock["modules"] == []
    diff = max(float((stock["image"] - ours[0]).abs().max()), float((stock["text"] - ours[1]).abs().max()))
    print(f"max abs diff {diff:g}")  # the figure the issue asks for (pytest -s)
    return diff


def test_the_shipped_base_exported_by_the_cli_loads_in_stock_open_clip(tmp_path, capsys):
    folder = tmp_path / "base"
    assert cli.main(["export", "--format", "open_clip", str(folder)]) == 0  # default: the shipped base
    assert "local-dir:" in capsys.readouterr().out
    config = json.loads((folder / CONFIG_JSON).read_text())
    assert config["preprocess_cfg"]["size"] == 64 and config["model_cfg"]["vision_cfg"]["image_size"] == 64
    images = _images(tmp_path)
    stock = _stock(tmp_path, folder, images)
    model = open_target(SHIPPED_BASE).model
    assert _compare(stock, _ours(model, images, stock["prompts"], 1.0)) <= TOLERANCE


def _lora_release(tmp_path) -> tuple[AlignedCLIP, str, str]:
    """A LoRA release of the shipped base with moved adapters and W, and preprocessing of its own
    (squashed, bilinear), published to a local store; returns (model, store, release id)."""
    mode = {"lora": LoraConfig(rank=4)}
    cfg = ModelConfig(image_tower=mode, preprocess=PreprocessConfig(resize_mode="squash", interpolation="bilinear",
                                                                    mean=(0.5, 0.4, 0.45), std=(0.25, 0.3, 0.2)))
    torch.manual_seed(0)
    model = AlignedCLIP(load_clip(cfg), cfg.image_tower).eval()
    with torch.no_grad():
        for _, adapter in adapters(model.clip.visual):
            adapter.lora_B.normal_(0, 0.05)
        model.spectral.skew.normal_(0, 0.2)
        model.spectral.log_sigma.normal_(0, 0.25)
    folder = save_checkpoint(tmp_path / "ckpt", model, model_description(model, cfg, world.SHAPES,
                                                                         world.PROMPT_TEMPLATE), {}, {})
    store = str(tmp_path / "store")
    return model, store, open_store(store).publish_release(folder)


def test_a_lora_release_by_id_at_t_loads_in_stock_open_clip(tmp_path):
    model, store, release_id = _lora_release(tmp_path)
    folder = tmp_path / "export"
    assert cli.main(["export", "--release", release_id, "--store", store, "--t", "0.5", "--format", "open_clip",
                     "--out", str(folder)]) == 0
    config = json.loads((folder / CONFIG_JSON).read_text())
    assert (config["preprocess_cfg"]["resize_mode"], config["po_cluster"]["t"]) == ("squash", 0.5)
    assert not any("lora_" in key for key in load_file(str(folder / "open_clip_model.safetensors")))
    images = _images(tmp_path)
    stock = _stock(tmp_path, folder, images)
    assert _compare(stock, _ours(model, images, stock["prompts"], 0.5)) <= TOLERANCE
    # t mattered: at t = 1 the release's embeddings are others
    assert float((_ours(model, images, stock["prompts"], 1.0)[0] - stock["image"]).abs().max()) > 1e-3


def test_an_export_folder_refuses_a_folder_of_other_files(tmp_path):
    (tmp_path / "mine.txt").write_text("not an export")
    with pytest.raises(ExportError, match="not an empty folder nor an earlier open_clip export"):
        export_open_clip_folder(SHIPPED_BASE, tmp_path)


def test_push_needs_the_open_clip_format_and_a_hub_name(tmp_path, capsys):
    assert cli.main(["export", str(tmp_path / "x.safetensors"), "--push", "hf-hub:org/name"]) == 2
    assert "--push uploads an open_clip folder" in capsys.readouterr().err
    assert cli.main(["export", "--format", "open_clip", str(tmp_path / "d"), "--push", "org/name"]) == 2
    assert "expected hf-hub:ORG/NAME" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()  # refused before anything was exported


# ---------------------------------------------------------------- --push hf-hub: against a local stand-in of the Hub

TOKEN = "hf_stand_in_token"


class HubStandIn(ThreadingHTTPServer):
    """The Hugging Face Hub's HTTP API as huggingface_hub and open_clip use it to push and load a model
    repository (create, validate-yaml, preupload, commit; resolve for downloads), files kept in memory.
    It answers every file "regular" (content inline in the commit), as the Hub does for small files."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _HubHandler)
        self.repos: dict[str, dict[str, bytes]] = {}
        self.commits: list[dict] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _HubHandler(BaseHTTPRequestHandler):
    server: HubStandIn

    def log_message(self, *args) -> None:  # quiet
        pass

    def _json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._json(401, {"error": "Invalid credentials"})
        path = self.path.split("?")[0]
        if path == "/api/repos/create":
            request = json.loads(body)
            repo = f"{request['organization']}/{request['name']}"
            if repo in self.server.repos:
                return self._json(409, {"error": "You already created this model repo",
                                        "url": f"{self.server.url}/{repo}"})
            self.server.repos[repo] = {}
            return self._json(200, {"url": f"{self.server.url}/{repo}"})
        if path == "/api/validate-yaml":
            content = json.loads(body)["content"]
            front = content.split("---")[1] if content.startswith("---") else ""
            ok = isinstance(yaml.safe_load(front) or {}, dict)
            return self._json(200 if ok else 400, {"errors": [] if ok else [{"message": "not a mapping"}]})
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit)/main", path)
        if match is None or match[1] not in self.server.repos:
            return self._json(404, {"error": f"no route or repository for {path}"})
        if match[2] == "preupload":
            files = json.loads(body)["files"]
            return self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                              for f in files]})
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        assert lines[0]["key"] == "header"
        for line in lines[1:]:
            assert line["key"] == "file" and line["value"]["encoding"] == "base64"
            self.server.repos[match[1]][line["value"]["path"]] = base64.b64decode(line["value"]["content"])
        oid = hashlib.sha1(body).hexdigest()
        self.server.commits.append({"repo": match[1], "summary": lines[0]["value"]["summary"], "oid": oid})
        return self._json(200, {"commitUrl": f"{self.server.url}/{match[1]}/commit/{oid}", "commitOid": oid})

    def _file(self, send_body: bool) -> None:
        match = re.fullmatch(r"/([^/]+/[^/]+)/resolve/main/(.+)", self.path.split("?")[0])
        files = self.server.repos.get(match[1], {}) if match else {}
        if match is None or match[2] not in files:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("Content-Length", "0")
            return self.end_headers()
        data = files[match[2]]
        self.send_response(200)
        self.send_header("X-Repo-Commit", self.server.commits[-1]["oid"])
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if send_body:
            self.wfile.write(data)

    def do_HEAD(self) -> None:
        self._file(False)

    def do_GET(self) -> None:
        self._file(True)


@pytest.fixture
def hub():
    server = HubStandIn()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_push_uploads_the_folder_and_stock_open_clip_loads_it_from_the_hub(tmp_path, hub, monkeypatch, capsys):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    folder = tmp_path / "base"
    assert cli.main(["export", "--format", "open_clip", str(folder), "--push", "hf-hub:po-org/typo-base"]) == 0
    assert "pushed to hf-hub:po-org/typo-base" in capsys.readouterr().out
    pushed = hub.repos["po-org/typo-base"]
    assert pushed == {p.name: p.read_bytes() for p in folder.iterdir()}  # every file, byte for byte
    assert [c["summary"] for c in hub.commits] == ["po-cluster export"]
    # what a user does with it: stock open_clip, hf-hub:, no po_cluster
    images = _images(tmp_path)
    out = tmp_path / "stock.pt"
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "hf-cache"), "HF_HUB_DISABLE_XET": "1"}
    script = STOCK.replace('"local-dir:" + folder', '"hf-hub:po-org/typo-base"').replace(
        'open(folder + "/open_clip_config.json")', "open(sys.argv[1])")
    run = subprocess.run([sys.executable, "-c", script, str(folder / CONFIG_JSON), str(out), *images], cwd=tmp_path,
                         env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    stock = torch.load(out)
    assert _compare(stock, _ours(open_target(SHIPPED_BASE).model, images, stock["prompts"], 1.0)) <= TOLERANCE


def test_a_refused_push_names_the_hub_and_the_reason(tmp_path, hub, monkeypatch, capsys):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    assert cli.main(["export", "--format", "open_clip", str(tmp_path / "d"), "--push", "hf-hub:po-org/x"]) == 1
    err = capsys.readouterr().err
    assert f"push to hf-hub:po-org/x ({hub.url}) failed" in err and "401" in err
    assert hub.repos == {}


# ---------------------------------------------------------------- po_cluster.load_release


@torch.no_grad()
def test_load_release_gives_open_clips_shapes_at_t(tmp_path):
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    import po_cluster

    aligned, store, release_id = _lora_release(tmp_path)
    model, preprocess, tokenizer = po_cluster.load_release(release_id, t=0.5, store=store)
    assert isinstance(model, open_clip.CLIP) and isinstance(tokenizer, open_clip.SimpleTokenizer)
    assert model.visual.preprocess_cfg["resize_mode"] == "squash"
    images = _images(tmp_path)
    pil = [Image.open(p) for p in images]
    image = model.encode_image(torch.stack([preprocess(im) for im in pil]), normalize=True)
    text = model.encode_text(tokenizer(PROMPTS), normalize=True)
    want = _ours(aligned, images, PROMPTS, 0.5)
    diff = max(float((image - want[0]).abs().max()), float((text - want[1]).abs().max()))
    print(f"max abs diff {diff:g}")
    assert diff <= TOLERANCE
    # its preprocess is open_clip's transform of the settings the model carries
    stock = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    assert all(torch.equal(preprocess(im), stock(im.convert("RGB"))) for im in pil)


def test_load_release_takes_the_shipped_base_and_folders(tmp_path):
    import po_cluster

    default, _, _ = po_cluster.load_release()  # the shipped base
    assert po_cluster.load_release.__defaults__[0] == SHIPPED_BASE
    aligned, store, release_id = _lora_release(tmp_path)
    by_folder, _, _ = po_cluster.load_release(f"{store}/releases/{release_id}", t=1.0)
    assert type(default) is type(by_folder) and by_folder.visual.preprocess_cfg["interpolation"] == "bilinear"
    with pytest.raises(FileNotFoundError, match="no checkpoint folder at"):
        po_cluster.load_release(str(tmp_path / "nothing"))
