"""Config loading and validation against ``workflow/schemas/config.schema.yaml`` (which holds every default)."""

from __future__ import annotations

import copy
import functools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from stages.core.errors import InputError

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"


@functools.lru_cache(maxsize=1)
def _schema_cached() -> dict:
    with open(SCHEMA_PATH) as f:
        return yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def _schema() -> dict:
    return copy.deepcopy(_schema_cached())


def schema_property(*path: str) -> dict:
    """The schema of one key, e.g. ``schema_property("postprocess", "iou_thr")`` or ``schema_property("model",
    "box_nms_thresh")`` (a model entry's key): type, default, bounds, description."""
    schema = _schema_cached()
    node = schema["properties"][path[0]] if path[0] in schema["properties"] else schema["$defs"][path[0]]
    for key in path[1:]:
        node = node["properties"][key]
    return copy.deepcopy(node)


def schema_default(*path: str) -> Any:
    """The schema's default of one key (see :func:`schema_property`). CLIs take their defaults from here
    instead of restating them."""
    node = schema_property(*path)
    if "default" not in node:
        raise KeyError(f"schema key {'/'.join(path)} has no default")
    return node["default"]


#: who reads a model key (its ``x-reads`` in the schema): the train rule (and checkpoint hash), the infer rule,
#: the experts rule, or nobody but the scheduler (the job's resources)
MODEL_PARTS = ("train", "infer", "experts", "resources")


def model_part(cfg: Mapping[str, Any], part: str, *, defs: str = "model") -> dict[str, Any]:
    """The keys of model section ``cfg`` that ``part`` reads (their ``x-reads`` in the schema), e.g.
    ``model_part(cfg, "train")``: what the train rule passes on and the checkpoint hashes. ``defs`` names the
    section's schema: a ``$defs`` entry (``model``, ``mask_model``) or a top-level section (``refiner``)."""
    if part not in MODEL_PARTS:
        raise ValueError(f"part must be one of {MODEL_PARTS}, got {part!r}")
    schema = _schema_cached()
    props = (schema["$defs"][defs] if defs in schema["$defs"] else schema["properties"][defs])["properties"]
    return {k: v for k, v in cfg.items() if props[k]["x-reads"] == part}


def defaults_validator(schema: dict):
    """A draft 2020-12 validator of ``schema`` that fills in defaults while validating. (jsonschema is imported
    here, not at the top: the stages' CLIs read schema defaults without validating.)"""
    import jsonschema

    base = jsonschema.Draft202012Validator
    validate_props = base.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for prop, sub in properties.items():
                if "default" in sub and prop not in instance:
                    instance[prop] = copy.deepcopy(sub["default"])
        yield from validate_props(validator, properties, instance, schema)

    # defaults inside $ref'd sections (every model entry) are filled too: $ref re-enters "properties"
    return jsonschema.validators.extend(base, {"properties": set_defaults})(schema)


def validate_config(config: dict[str, Any], *, source: object = "config", cross_refs: bool = True
                    ) -> dict[str, Any]:
    """Validate ``config`` (in place: defaults are filled in) or raise :class:`InputError` naming the key.
    ``cross_refs=False`` skips the checks between models (validating one model section on its own)."""
    schema = _schema()
    validator = defaults_validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        err = errors[0]
        path = "/".join(str(p) for p in err.absolute_path) or "(top level)"
        raise InputError(f"config does not match {SCHEMA_PATH.name}: {err.message}", file=source, field=path)
    # second pass: defaults inside $ref'd model entries were filled during iteration; re-check consistency
    for name, m in config.get("models", {}).items():
        if any(s >= m["epochs"] + 1 for s in m["lr_steps"]):
            raise InputError(f"lr_steps {m['lr_steps']} must be <= epochs {m['epochs']}", file=source,
                             field=f"models/{name}/lr_steps")
        if m["min_size"] > m["max_size"]:
            raise InputError("min_size > max_size", file=source, field=f"models/{name}/min_size")
        if len(m["cascade_weights"]) != len(m["cascade_iou"]):
            raise InputError(f"cascade_weights {m['cascade_weights']} needs one weight per cascade_iou entry "
                             f"{m['cascade_iou']}", file=source, field=f"models/{name}/cascade_weights")
        try:
            from stages.models.registry import check_backbone_name

            check_backbone_name(m["backbone"])
        except ValueError as exc:
            raise InputError(str(exc), file=source, field=f"models/{name}/backbone") from exc
        if m["decoupled_backbone"] and m["head"] != "tsd":
            raise InputError("decoupled_backbone needs head: tsd (the sibling head reads a single pyramid)",
                             file=source, field=f"models/{name}/decoupled_backbone")
        check_confusing_groups(m["confusing_groups"], field=f"models/{name}/confusing_groups", source=source,
                               classes=known_classes(config) if cross_refs and m["confusing_groups"] else None)
        avg = m["average_epochs"]
        if avg is not None and not 1 <= avg[0] <= avg[1] <= m["epochs"]:
            raise InputError(f"average_epochs {avg} must satisfy 1 <= a <= b <= epochs {m['epochs']}", file=source,
                             field=f"models/{name}/average_epochs")
        data = m["train_data"]
        if data is not None and cross_refs:
            if data not in config.get("external", {}):
                raise InputError(f"train_data names {data!r}, not an entry of the external section "
                                 f"{sorted(config.get('external', {}))}", file=source, field=f"models/{name}/train_data")
            if m["expert_of"] is not None:
                raise InputError("a model trains on an external dataset (train_data) or is mined from a base model "
                                 "(expert_of), not both", file=source, field=f"models/{name}/train_data")
        init = m["init_from"]
        if init is not None and cross_refs:
            if init == name or init not in config["models"]:
                raise InputError(f"init_from must name another model, not {init!r}; models are "
                                 f"{sorted(config['models'])}", file=source, field=f"models/{name}/init_from")
            if config["models"][init].get("init_from") is not None:
                raise InputError(f"init_from names {init!r}, itself started from another model (one level only)",
                                 file=source, field=f"models/{name}/init_from")
            if m["weights"] is not None:
                raise InputError("init_from and weights both give the starting weights: keep one", file=source,
                                 field=f"models/{name}/init_from")
        if m["mask_boxes"] and m["train_data"] is not None:
            raise InputError("mask_boxes adds boxes to the dataset's own train split, not to an external dataset",
                             file=source, field=f"models/{name}/mask_boxes")
        if m["mask_boxes"] and not config.get("dataset", {}).get("masks_csv"):
            raise InputError("mask_boxes needs the dataset's instance masks (dataset.masks_csv)", file=source,
                             field=f"models/{name}/mask_boxes")
        base = m["expert_of"]
        if base is not None:
            if not m["expert"]:
                raise InputError(f"an expert model (expert_of: {base}) needs expert: true", file=source,
                                 field=f"models/{name}/expert")
            if not cross_refs:
                continue
            if base == name or base not in config["models"]:
                raise InputError(f"expert_of must name another model, not {base!r}; models are "
                                 f"{sorted(config['models'])}", file=source, field=f"models/{name}/expert_of")
            if config["models"][base].get("expert_of") is not None:
                raise InputError(f"expert_of names {base!r}, itself an expert model", file=source,
                                 field=f"models/{name}/expert_of")
    models = sorted(config.get("models", {}))
    ens = config.setdefault("ensemble", {})
    ens.setdefault("groups", {"all": models})
    for g, members in ens["groups"].items():
        unknown = sorted(set(members) - set(models))
        if unknown:
            raise InputError(f"unknown model(s) {unknown}; models are {models}", file=source,
                             field=f"ensemble/groups/{g}")
    auto = config.get("autoensemble", {})
    leaves = auto.get("leaves", {})
    for key, known in (("models", models), ("groups", sorted(ens["groups"]))):
        unknown = sorted(set(leaves.get(key) or []) - set(known))
        if unknown:
            raise InputError(f"unknown {key} {unknown}; they are {known}", file=source,
                             field=f"autoensemble/leaves/{key}")
    if leaves.get("models") == [] and not leaves.get("groups"):
        raise InputError("no leaves: give models and/or groups", file=source, field="autoensemble/leaves")
    if auto and not auto.get("max_candidates") and not auto.get("max_minutes"):
        raise InputError("give a search budget: max_candidates and/or max_minutes", file=source,
                         field="autoensemble/max_candidates")
    abl = config.setdefault("ablation", {})
    abl.setdefault("model", models[0] if models else None)
    # the model ladder compares whole detectors: expert models cover a few classes only
    abl.setdefault("models", [m for m in models if config["models"][m]["expert_of"] is None])
    unknown = sorted(set(abl["models"]) - set(models))
    if unknown:
        raise InputError(f"unknown model(s) {unknown}", file=source, field="ablation/models")
    if abl["model"] not in models:
        raise InputError(f"unknown model {abl['model']!r}", file=source, field="ablation/model")
    for key, field in ((abl.get("group"), "ablation/group"), (config.get("submit", {}).get("ensemble"),
                                                                 "submit/ensemble")):
        if key is not None and key not in ens["groups"]:
            raise InputError(f"unknown ensemble group {key!r}; groups are {sorted(ens['groups'])}", file=source,
                             field=field)
    for kind in ("postprocess", "ensemble"):
        keys = set(schema["properties"][kind]["properties"]) - {"groups", "mode"}
        for variant, spec in abl.get(kind, {}).items():
            if variant == "default":
                raise InputError("'default' names the configured chain, not an ablation variant", file=source,
                                 field=f"ablation/{kind}/default")
            unknown = sorted(set(spec) - keys)
            if unknown:
                raise InputError(f"unknown key(s) {unknown}; a variant changes keys of the {kind} section "
                                 f"{sorted(keys)}", file=source, field=f"ablation/{kind}/{variant}")
    seg = config.get("segmentation", {})
    mask_models = sorted(seg.get("models") or {})
    unknown = sorted(set(seg.get("ensemble") or []) - set(mask_models))
    if unknown:
        raise InputError(f"unknown mask model(s) {unknown}; segmentation.models are {mask_models}", file=source,
                         field="segmentation/ensemble")
    if seg.get("enabled") and mask_models and seg.get("refine") and cross_refs:
        det = config.get("refiner", {}).get("detector")
        if det not in models:
            raise InputError(f"the refiner's detector {det!r} is not a model of this config {models}", file=source,
                             field="refiner/detector")
        if config["models"][det]["expert"]:
            raise InputError(f"the refiner's detector {det!r} is an expert model: it sees a few classes only",
                             file=source, field="refiner/detector")
    fr = config.get("split", {}).get("fractions")
    if fr is not None and abs(sum(fr) - 1.0) > 1e-6:
        raise InputError(f"fractions {fr} must sum to 1", file=source, field="split/fractions")
    return config


def known_classes(config: Mapping[str, Any]) -> dict[str, str] | None:
    """MID -> display name of the dataset's classes when the config alone tells them: the built-in dataset's
    (``dataset.generate``), or a ``classes_csv`` that already exists; None otherwise (then the training stage
    checks the names against its classes)."""
    ds = config.get("dataset", {})
    if ds.get("generate", True):
        from stages.data.taxonomy import CLASSES

        return {c.label: c.name for c in CLASSES}
    path = Path(ds.get("dir", "")) / ds.get("classes_csv", "")
    if not path.is_file():
        return None
    from stages.formats.openimages import read_classes

    df = read_classes(path)
    return dict(zip(df["label"], df["name"]))


def check_confusing_groups(groups: list[list[str]], *, field: str, source: object = "config",
                           classes: Mapping[str, str] | None = None) -> None:
    """A model's ``confusing_groups``: no class twice (by MID or name, within or across groups) and, when the
    class list is known (``classes``: MID -> name), every entry a MID or an unambiguous display name of it."""
    names: dict[str, list[str]] = {}
    for mid, nm in (classes or {}).items():
        names.setdefault(nm, []).append(mid)
    seen: dict[str, str] = {}
    for i, group in enumerate(groups):
        for entry in group:
            mid = entry
            if classes is not None:
                if entry in classes:
                    mid = entry
                elif len(names.get(entry, ())) == 1:
                    mid = names[entry][0]
                else:
                    what = (f"names several classes {sorted(names[entry])}: give the MID" if entry in names else
                            "is not a class of the dataset (neither a MID nor a display name)")
                    raise InputError(f"group {i}: {entry!r} {what}", file=source, field=field)
            if mid in seen:
                raise InputError(f"group {i}: {entry!r} is given twice (already as {seen[mid]!r}); a class may be "
                                 "in one group once", file=source, field=field)
            seen[mid] = entry


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f)
    except FileNotFoundError as exc:
        raise InputError("config file not found", file=path) from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise InputError(f"malformed YAML: {exc}", file=path, row=(mark.line + 1) if mark else None) from exc
    if not isinstance(cfg, dict):
        raise InputError("config must be a mapping", file=path)
    return validate_config(cfg, source=path)
