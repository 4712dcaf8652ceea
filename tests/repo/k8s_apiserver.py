"""What a Kubernetes API server does to a custom resource after its OpenAPI schema check, done offline.

No API server can run on these machines, so the k8s test does its steps itself, in the server's
order and with the server's rules (apiextensions-apiserver):

1. **Defaults**: every `default` of the CRD's structural schema is filled in where the field is
   absent and its parent object is present (inside list items and map values too), before anything
   is validated: a list-map key such as a port's `protocol` is compared with its default.
2. **List types**: `x-kubernetes-list-type: set` lists hold no item twice; `map` lists hold no two
   items with the same `x-kubernetes-list-map-keys`, and every item has its keys.
3. **CEL rules**: every `x-kubernetes-validations` rule is evaluated, by a CEL implementation
   (cel-python), with `self` bound to the value at its node, wherever that value is present (the
   server skips a rule whose field is absent). A rule that reads `oldSelf` is a transition rule:
   evaluated only on an update, and only where the old object has a value at the same place (through
   objects, maps and list-map items matched by their keys; never across atomic or set lists). A rule
   that does not hold is refused with the rule's own `message`.

Errors read like the server's: `<field path>: Invalid value: "<type>": <message>`,
`<field path>: Duplicate value: …`, `<field path>: Required value`.
"""
from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import celpy
from celpy import celtypes
from celpy.evaluation import CELEvalError

# The keys of an x-kubernetes-validations entry this check implements. A CRD that uses another
# (messageExpression, fieldPath, reason, optionalOldSelf) fails loudly rather than being half-checked.
RULE_KEYS = {"rule", "message"}
_STRING_LITERAL = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"")


@dataclass(frozen=True)
class Rule:
    """One compiled CEL rule of a CRD: where it sits in the schema (a path of property names, `[*]`
    for list items and map values), its text and message."""

    where: str
    text: str
    message: str
    program: Any = field(compare=False, repr=False)
    transition: bool = False

    @property
    def key(self) -> tuple[str, str]:
        return self.where, self.text


@dataclass
class Admission:
    """The outcome of one create or update: the object as stored (defaults in), the errors, and
    every CEL evaluation made (rule, field path), skipped transition rules apart."""

    obj: dict
    errors: list[str] = field(default_factory=list)
    evaluated: list[tuple[Rule, str]] = field(default_factory=list)


def is_transition_rule(text: str) -> bool:
    """Whether a rule reads oldSelf (outside its string literals)."""
    return re.search(r"\boldSelf\b", _STRING_LITERAL.sub("''", text)) is not None


def _type_name(value: Any) -> str:
    """The type word the API server prints in an Invalid value error."""
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    return "string"


def _child_path(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


class CustomResourceDefinition:
    """One served version of a CRD: its structural schema and its compiled CEL rules."""

    def __init__(self, crd: dict, version: str) -> None:
        [found] = [v for v in crd["spec"]["versions"] if v["name"] == version]
        self.group, self.kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        self.api_version = f"{self.group}/{version}"
        self.schema: dict = found["schema"]["openAPIV3Schema"]
        self.env = celpy.Environment()
        self.rules: dict[int, list[Rule]] = {}  # id(schema node) → its rules
        self._compile(self.schema, "")

    def _compile(self, node: Any, where: str) -> None:
        if not isinstance(node, dict):
            return
        rules = []
        for entry in node.get("x-kubernetes-validations", []):
            unknown = set(entry) - RULE_KEYS
            if unknown:
                raise ValueError(f"{self.kind} {where or '(root)'}: rule keys {sorted(unknown)} are not implemented")
            ast = self.env.compile(entry["rule"])  # a rule that does not parse fails here, naming itself
            rules.append(Rule(where or "(root)", entry["rule"], entry.get("message", f"failed rule: {entry['rule']}"),
                              self.env.program(ast), is_transition_rule(entry["rule"])))
        if rules:
            self.rules[id(node)] = rules
        for name, sub in node.get("properties", {}).items():
            self._compile(sub, _child_path(where, name))
        if isinstance(node.get("items"), dict):
            self._compile(node["items"], f"{where}[*]")
        if isinstance(node.get("additionalProperties"), dict):
            self._compile(node["additionalProperties"], f"{where}[*]")

    def all_rules(self) -> list[Rule]:
        return [rule for rules in self.rules.values() for rule in rules]

    # ---- 1. defaults --------------------------------------------------------------------------

    def default(self, obj: dict) -> dict:
        """A copy of obj with the schema's defaults filled in, as the server stores it."""
        out = copy.deepcopy(obj)
        _apply_defaults(self.schema, out)
        return out

    # ---- 2 and 3. list types and CEL rules ------------------------------------------------------

    def create(self, obj: dict) -> Admission:
        return self._admit(obj, None)

    def update(self, old: dict, new: dict) -> Admission:
        """An update of a stored object: both are defaulted, and transition rules see the old one."""
        return self._admit(new, self.default(old))

    def _admit(self, obj: dict, old: dict | None) -> Admission:
        if (obj.get("apiVersion"), obj.get("kind")) != (self.api_version, self.kind):
            raise ValueError(f"{obj.get('apiVersion')}/{obj.get('kind')} is not {self.api_version}/{self.kind}")
        admission = Admission(self.default(obj))
        self._walk(self.schema, admission.obj, old, "", admission)
        return admission

    def _walk(self, node: dict, value: Any, old: Any, path: str, admission: Admission) -> None:
        if value is None:  # an absent field: nothing below it is checked, as on the server
            return
        for rule in self.rules.get(id(node), []):
            if rule.transition and old is None:
                continue  # a create, or a value the old object did not have
            admission.evaluated.append((rule, path or "(root)"))
            problem = _evaluate(rule, value, old)
            if problem is not None:
                admission.errors.append(f"{path or '(root)'}: Invalid value: \"{_type_name(value)}\": {problem}")
        if isinstance(value, list) and isinstance(node.get("items"), dict):
            list_type = node.get("x-kubernetes-list-type", "atomic")
            admission.errors.extend(_list_type_errors(node, value, path))
            old_items = _correlate(node, value, old) if list_type == "map" else [None] * len(value)
            for index, (item, old_item) in enumerate(zip(value, old_items, strict=True)):
                self._walk(node["items"], item, old_item, f"{path}[{index}]", admission)
        elif isinstance(value, dict):
            olds = old if isinstance(old, dict) else {}
            properties = node.get("properties", {})
            for name, sub in properties.items():
                self._walk(sub, value.get(name), olds.get(name), _child_path(path, name), admission)
            extra = node.get("additionalProperties")
            if isinstance(extra, dict):
                for name, item in value.items():
                    if name not in properties:
                        self._walk(extra, item, olds.get(name), f"{path}[{name}]", admission)


def _apply_defaults(node: dict, value: Any) -> None:
    if isinstance(value, dict):
        for name, sub in node.get("properties", {}).items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                _apply_defaults(sub, value[name])
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            for name, item in value.items():
                if name not in node.get("properties", {}):
                    _apply_defaults(extra, item)
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        for item in value:
            _apply_defaults(node["items"], item)


def _evaluate(rule: Rule, value: Any, old: Any) -> str | None:
    """None if the rule holds; else the rule's message (or, if it cannot be evaluated, why)."""
    activation = {"self": celpy.json_to_cel(value)}
    if rule.transition:
        activation["oldSelf"] = celpy.json_to_cel(old)
    try:
        result = rule.program.evaluate(activation)
    except CELEvalError as error:
        return f"rule {rule.text!r} could not be evaluated: {error}"
    if isinstance(result, CELEvalError):
        return f"rule {rule.text!r} could not be evaluated: {result}"
    if not isinstance(result, celtypes.BoolType):
        return f"rule {rule.text!r} gave {type(result).__name__}, not a bool"
    return None if bool(result) else rule.message


def _map_key(node: dict, item: Any) -> tuple | None:
    if not isinstance(item, dict):
        return None
    keys = node.get("x-kubernetes-list-map-keys", [])
    return tuple(item.get(key) for key in keys) if all(key in item for key in keys) else None


def _list_type_errors(node: dict, value: list, path: str) -> Iterator[str]:
    list_type = node.get("x-kubernetes-list-type", "atomic")
    if list_type == "set":
        seen: list[Any] = []
        for index, item in enumerate(value):
            if item in seen:
                yield f"{path}[{index}]: Duplicate value: {json.dumps(item)}"
            seen.append(item)
    elif list_type == "map":
        keys, seen_keys = node.get("x-kubernetes-list-map-keys", []), set()
        for index, item in enumerate(value):
            key = _map_key(node, item)
            if key is None:
                missing = [k for k in keys if not isinstance(item, dict) or k not in item]
                yield from (f"{path}[{index}].{k}: Required value" for k in missing)
                continue
            if key in seen_keys:
                yield f"{path}[{index}]: Duplicate value: {json.dumps(dict(zip(keys, key, strict=True)))}"
            seen_keys.add(key)


def _correlate(node: dict, value: list, old: Any) -> list[Any]:
    """For each item of a list-map, the old item with the same keys (or None)."""
    if not isinstance(old, list):
        return [None] * len(value)
    by_key = {_map_key(node, item): item for item in old}
    return [by_key.get(_map_key(node, item)) for item in value]
