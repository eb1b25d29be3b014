"""``fedloom watermark verify``: does a model carry a run's WAFFLE watermark?

Reads the secret trigger set of a watermarked run (``watermark.safetensors`` in its run
directory, or ``--trigger FILE``) and a model (the run's latest checkpoint, the given
checkpoint, or ``--model FILE``: another run directory, a fedloom checkpoint, a
safetensors file of the model's named tensors or of one flat ``global`` vector, or a
``.npy`` flat vector), and prints the trigger-set accuracy with its binomial p-value
against chance (:mod:`fedloom.server.watermark`).

Exit codes: 0 the model carries the watermark (p < ``--alpha``), 1 it does not, 2 a
user error (no watermark in the run, an unreadable or mismatched model file).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from fedloom.cli.common import user_error

EXIT_NO_WATERMARK = 1
DEFAULT_ALPHA = 1e-6


def add_watermark_parser(sub: Any) -> None:
    """The ``watermark`` command and its ``verify`` subcommand."""
    watermark = sub.add_parser("watermark", help="check models for a run's WAFFLE watermark")
    actions = watermark.add_subparsers(dest="watermark_command", required=True)
    verify = actions.add_parser(
        "verify",
        help="test whether a model carries the watermark of a run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verify.add_argument(
        "source",
        type=Path,
        metavar="RUN_DIR_OR_CHECKPOINT",
        help="a watermarked run directory, or one of its checkpoints (the model to test "
        "unless --model is given)",
    )
    verify.add_argument(
        "--model", type=Path, metavar="FILE", help="test this model instead (see above)"
    )
    verify.add_argument(
        "--trigger",
        type=Path,
        metavar="FILE",
        help="the trigger set to test with (default: the run's watermark.safetensors)",
    )
    verify.add_argument(
        "--alpha",
        type=float,
        default=DEFAULT_ALPHA,
        help=f"significance level: accept when p < ALPHA (default {DEFAULT_ALPHA:g})",
    )


def cmd_watermark(args: argparse.Namespace, console: Any) -> int:
    # Imported here: torch and the data sets are not needed for the other commands' help.
    from fedloom.config import ConfigError
    from fedloom.server.watermark import WatermarkError
    from fedloom.store import RunStoreError

    try:
        return _verify(args, console)
    except (WatermarkError, ConfigError, RunStoreError) as err:
        return user_error(err)


def _verify(args: argparse.Namespace, console: Any) -> int:
    from fedloom.server.watermark import WATERMARK_FILE, TriggerSet, WatermarkError, verify

    if not 0.0 < args.alpha < 1.0:
        raise WatermarkError(f"--alpha must be between 0 and 1, got {args.alpha:g}")
    run_dir, checkpoint = _run_of(args.source)
    trigger_path = args.trigger or run_dir / WATERMARK_FILE
    if args.trigger is None and not trigger_path.is_file():
        raise WatermarkError(
            f"{run_dir} holds no watermark ({WATERMARK_FILE} is missing): the run was made "
            "without watermark.enabled = true; pass a watermarked run or --trigger FILE"
        )
    trigger = TriggerSet.load(trigger_path)
    learner, input_shape = _model_of(run_dir)
    if tuple(trigger.x.shape[1:]) != input_shape:
        raise WatermarkError(
            f"{trigger_path} holds inputs of shape {tuple(trigger.x.shape[1:])}, but the "
            f"model of {run_dir} takes {input_shape}; pass the trigger file of this run"
        )
    model_path = args.model or checkpoint or run_dir
    weights = _load_model(model_path, learner.binding.spec)
    verdict = verify(learner, weights, trigger, alpha=args.alpha)
    chance = 1.0 / verdict.num_labels
    lines = [
        f"trigger set: {trigger_path} ({verdict.total} inputs, {verdict.num_labels} labels, "
        f"chance {chance:.1%})",
        f"model: {model_path}",
        f"trigger accuracy: {verdict.accuracy:.1%} ({verdict.correct} of {verdict.total})",
        f"p-value: {verdict.p_value:.3g} (binomial, H0: trained without the trigger set)",
    ]
    for line in lines:
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    if verdict.carries_watermark:
        console.print(
            f"verdict: the model carries the watermark (p < {args.alpha:g})",
            markup=False,
            highlight=False,
        )
        return 0
    console.print(
        f"verdict: no watermark: p = {verdict.p_value:.3g} is not below {args.alpha:g}",
        markup=False,
        highlight=False,
    )
    return EXIT_NO_WATERMARK


def _run_of(source: Path) -> tuple[Path, Path | None]:
    """The run directory of ``source`` and the checkpoint it names (None: a run dir)."""
    from fedloom.server.watermark import WatermarkError
    from fedloom.store import CHECKPOINTS_DIR, DB_FILE

    if source.is_dir():
        if not (source / DB_FILE).is_file():
            raise WatermarkError(
                f"{source} is not a fedloom run directory (no {DB_FILE}); pass the --out "
                "directory of a watermarked run"
            )
        return source, None
    if source.is_file():
        run_dir = source.parent.parent
        if source.parent.name != CHECKPOINTS_DIR or not (run_dir / DB_FILE).is_file():
            raise WatermarkError(
                f"{source} is not a checkpoint inside a run directory; pass the run directory "
                "and the file as --model"
            )
        return run_dir, source
    raise WatermarkError(f"{source} does not exist; pass a run directory or a checkpoint")


def _model_of(run_dir: Path) -> tuple[Any, tuple[int, ...]]:
    """The run's model (rebuilt from its stored config: built-in data sets and models
    only) and the shape of its inputs."""
    from fedloom.config import config_from_dict
    from fedloom.data import build_federated_dataset
    from fedloom.server.watermark import WatermarkError
    from fedloom.store import RunStore
    from fedloom.strategies import build_learner

    with RunStore.open(run_dir) as store:
        cfg = config_from_dict(store.config())
    if cfg.data.name == "custom":
        raise WatermarkError(
            f"{run_dir} trained a model given through the Python API, which this command "
            "cannot rebuild; call fedloom.server.watermark.verify with your model"
        )
    data = build_federated_dataset(cfg.data, cfg.seed)
    return build_learner(cfg, data), tuple(data.input_shape)


def _load_model(path: Path, spec: Any) -> np.ndarray:
    """A flat model vector from a run directory, checkpoint, safetensors or .npy file."""
    from safetensors import SafetensorError, safe_open

    from fedloom.server.watermark import WatermarkError
    from fedloom.store import RunStore, RunStoreError

    if path.is_dir():
        with RunStore.open(path) as store:
            ckpt = store.latest_checkpoint()
        if ckpt is None:
            raise RunStoreError(f"{path} has no checkpoint yet; let the run finish a round")
        vector = ckpt.tensors["global"]
    elif not path.is_file():
        raise WatermarkError(f"model file {path} does not exist")
    elif path.suffix == ".npy":
        try:
            vector = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise WatermarkError(f"{path} is not a readable .npy vector ({err})") from None
    else:
        try:
            with safe_open(str(path), framework="numpy") as fh:
                arrays = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118
        except (SafetensorError, OSError) as err:
            raise WatermarkError(
                f"{path} is neither a safetensors file nor a .npy vector ({err})"
            ) from None
        if "global" in arrays:  # a fedloom checkpoint, or a saved flat vector
            vector = arrays["global"]
        else:
            try:
                vector = spec.flatten(arrays)
            except (KeyError, ValueError) as err:
                raise WatermarkError(
                    f"{path} does not hold this run's model ({err}); pass a model of the "
                    "same architecture"
                ) from None
    vector = np.asarray(vector, dtype=np.float32).reshape(-1)
    if vector.size != spec.size:
        raise WatermarkError(
            f"the model in {path} has {vector.size} parameters, the watermarked run's model "
            f"has {spec.size}; verify only models of the same architecture"
        )
    return vector
