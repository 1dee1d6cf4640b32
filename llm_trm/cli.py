"""`llm-trm`: LightningCLI (fit / validate / test / predict) plus the project's own subcommands.

    llm-trm fit --config configs/phase1/stage1a.yaml --model.d_compressed 512
    llm-trm fit --config configs/phase1/stage1a.yaml --trainer.devices 8 --trainer.strategy ddp \
        --trainer.precision bf16-mixed

Errors a user can fix (LLMTRMError, and every command-line / config parse error) are printed as
one line, `llm-trm: error: ...`, with exit code 2; set LLM_TRM_DEBUG=1 for the traceback.

Checkpoints are never unpickled: `--ckpt_path` given as a URL (http(s), s3://, ...) is downloaded
into a temporary folder and handed to Lightning as a local file, every checkpoint is read with
`weights_only=True`, and `--weights_only false` is refused.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

import jsonargparse
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningCLI

from llm_trm.errors import ConfigError, ConfigMismatchError, LLMTRMError, UnreadableCheckpointError
from llm_trm.hub import fetch_checkpoint, is_remote, load_torch_checkpoint

LIGHTNING_COMMANDS = {
    "fit": "train a model (phase 1 compressor, phase 2 TRM, phase 3 GRPO)",
    "validate": "run the validation loop once",
    "test": "run the test loop once",
    "predict": "run the predict loop",
}

# name -> (module with `main(argv) -> int` and `DESCRIPTION`); imported only when used
OWN_COMMANDS: dict[str, str] = {
    "datagen": "llm_trm.datagen",
    "evaluate": "llm_trm.evaluate",
    "push": "llm_trm.push",
}


def _own_command(name: str):
    try:
        return importlib.import_module(OWN_COMMANDS[name])
    except ModuleNotFoundError as err:
        if err.name != OWN_COMMANDS[name]:
            raise
        return None

# init args a datamodule takes from its model (the model's value is the single source of truth); a link
# applies only when both the chosen model class and the chosen datamodule class have the argument
LINKED_INIT_ARGS = ("backbone", "trust_remote_code", "warm_start_steps")
# what a checkpoint was trained against; resuming it under other values is an error, not a silent switch
IDENTITY_INIT_ARGS = ("backbone", "layer", "d_compressed", "compressor_checkpoint")
# `ckpt_path` values Lightning resolves itself (to its own checkpoints); they are still read weights-only
LIGHTNING_CKPT_NAMES = ("last", "best", "hpc", "registry")


class LLMTRMCLI(LightningCLI):
    def __init__(self, args: Sequence[str] | None = None, **kwargs) -> None:
        super().__init__(
            args=args,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            **kwargs,
        )

    def _instantiate_trainer(self, config: dict, callbacks: list) -> object:
        # a rich progress bar by default, unless the config brings its own or turns bars off
        configured = list(config.get("callbacks") or []) + list(callbacks)
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in configured):
            callbacks.append(RichProgressBar())
        return super()._instantiate_trainer(config, callbacks)

    def init_parser(self, **kwargs: Any) -> Any:
        # a parse error raises (main prints it as one line) instead of printing usage and exiting
        kwargs.setdefault("exit_on_error", False)
        return super().init_parser(**kwargs)

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if "weights_only" in self._subcommand_method_arguments[subcommand]:
            kwargs["weights_only"] = True  # otherwise Lightning unpickles a URL checkpoint (weights_only off)
        return kwargs

    def _parse_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return super()._parse_ckpt_path()
        settings = self.config[subcommand]
        if settings.get("weights_only") is False:
            raise UnreadableCheckpointError(
                "--weights_only false is refused: llm-trm reads checkpoints as tensors and plain values only "
                "and never runs code from one; drop the option."
            )
        ckpt_path = settings.get("ckpt_path")
        if ckpt_path and str(ckpt_path).split(":")[0] not in LIGHTNING_CKPT_NAMES:
            source = str(ckpt_path)
            if is_remote(ckpt_path):
                # one download, read weights-only here and by Lightning, deleted when the run ends
                self._downloads = tempfile.TemporaryDirectory(prefix="llm-trm-ckpt-")
                ckpt_path = settings["ckpt_path"] = str(fetch_checkpoint(ckpt_path, self._downloads.name))
            self._check_resumed_identity(ckpt_path, source)
        super()._parse_ckpt_path()

    def _check_resumed_identity(self, ckpt_path: str, source: str) -> None:
        # Lightning replaces the model's config with the checkpoint's hyperparameters when resuming;
        # first make sure the user did not configure a different backbone / layer / D'. Reading the
        # checkpoint here also turns a corrupt or unsafe file into one line before anything loads.
        subcommand = self.config["subcommand"]
        saved = load_torch_checkpoint(ckpt_path, source=source).get("hyper_parameters", {})
        if saved:
            configured = self.config[subcommand].get("model", {}).get("init_args") or {}
            for key in IDENTITY_INIT_ARGS:
                if key in saved and key in configured and saved[key] != configured[key]:
                    raise ConfigMismatchError(
                        f"{source} was trained with {key}={saved[key]!r} but this run has "
                        f"{key}={configured[key]!r}: resume with the same {key} or start a new run."
                    )

    def add_arguments_to_parser(self, parser) -> None:
        for key in LINKED_INIT_ARGS:
            parser.link_arguments(f"model.init_args.{key}", f"data.init_args.{key}", apply_on="parse")


def print_help() -> None:
    lines = ["usage: llm-trm <command> [options]   (llm-trm <command> --help for its options)", "", "commands:"]
    commands = dict(LIGHTNING_COMMANDS)
    for name in OWN_COMMANDS:
        module = _own_command(name)
        if module is not None:
            commands[name] = module.DESCRIPTION
    width = max(map(len, commands))
    lines += [f"  {name:<{width}}  {desc}" for name, desc in commands.items()]
    lines += ["", "example: llm-trm fit --config configs/phase1/stage1a.yaml --model.d_compressed 512"]
    print("\n".join(lines))


def user_error(err: BaseException) -> LLMTRMError | None:
    """The LLMTRMError behind `err`, if any: jsonargparse wraps errors raised while it instantiates classes.

    A parse error (bad number, unknown key, wrong type, missing config file) becomes a one-line ConfigError.
    """
    chain = _exception_chain(err)
    known = next((e for e in chain if isinstance(e, LLMTRMError)), None)
    if known is None and isinstance(err, (jsonargparse.ArgumentError, argparse.ArgumentError)):
        return ConfigError(one_line_parse_error(chain))
    return known


def _exception_chain(err: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = err
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


# jsonargparse's restricted number types, as a user reads them
NUMBER_TYPES = {
    "PositiveInt": "an integer > 0",
    "NonNegativeInt": "an integer >= 0",
    "PositiveFloat": "a number > 0",
    "NonNegativeFloat": "a number >= 0",
    "ClosedUnitInterval": "a number in [0, 1]",
    "OpenUnitInterval": "a number in (0, 1)",
}


def one_line_parse_error(chain: Sequence[BaseException]) -> str:
    """jsonargparse's nested, multi-line parse error as one line naming the key, the value and what to do.

    `chain` runs from the error the parser raised to its innermost cause: the outer errors name
    the keys (`Parser key "model"`, then `Parser key "d_compressed"`), the inner ones the reason.
    """
    messages = [str(e).strip() for e in chain if str(e).strip()]
    keys: list[str] = []
    for message in messages:
        found = re.match(r'Parser key "([^"]+)"', message)
        if found and (not keys or keys[-1] != found.group(1)):
            keys.append(found.group(1))
    option = "--" + ".".join(keys) if keys else ""
    fix = "fix it on the command line or in the config (--help lists the options)."
    text = "\n".join(messages)
    unknown = re.search(r"Option '([^']+)' is not accepted", text)
    if unknown:
        owner = re.search(r"class_path '([^']+)'", text)
        where = f" of {owner.group(1)}" if owner else ""
        return f"{option}.{unknown.group(1)} is not an option{where}; {fix}".lstrip(".")
    typed = next((m for m in map(_typed_reason, messages) if m), None)
    if typed:
        value, expected = typed
        return f"{option} {value} is not valid: it must be {expected}; {fix}".strip()
    reason = " ".join(messages[-1].split()) if messages else "invalid arguments"
    return f"{option}: {reason}; {fix}" if option else f"{reason}; {fix}"


def _typed_reason(message: str) -> tuple[str, str] | None:
    """(value, what was expected) from jsonargparse's innermost type errors, else None."""
    restricted = re.match(r"Not of type (\w+): (\S+) does not conform to restriction (.+)", message)
    if restricted:
        name, value, rule = restricted.groups()
        return value, NUMBER_TYPES.get(name, f"{name} ({rule})")
    wrong = re.match(r"Not of type (\w+): invalid literal for \w+\(\) with base 10: (.+)", message)
    if wrong:
        return wrong.group(2).strip("'\""), NUMBER_TYPES.get(wrong.group(1), wrong.group(1))
    expected = re.match(r"Expected a <class '([\w.]+)'>\. Got value: (.+)", message)
    if expected:
        return expected.group(2), f"of type {expected.group(1)}"
    return None


def main(args: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if args is None else args)
    try:
        if not argv or argv[0] in ("-h", "--help"):
            print_help()
            return 0
        command = _own_command(argv[0]) if argv[0] in OWN_COMMANDS else None
        if command is not None:
            return command.main(argv[1:]) or 0
        # from the console LightningCLI reads sys.argv itself; from Python it gets the list
        LLMTRMCLI(args=None if args is None else argv)
        return 0
    except Exception as err:
        known = user_error(err)
        if known is None or os.environ.get("LLM_TRM_DEBUG"):
            raise
        print(f"llm-trm: error: {known}", file=sys.stderr)
        if args is None:
            sys.exit(2)
        raise known from None


if __name__ == "__main__":
    sys.exit(main())
