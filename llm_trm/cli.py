"""`llm-trm`: LightningCLI (fit / validate / test / predict) plus the project's own subcommands.

    llm-trm fit --config configs/phase1/stage1a.yaml --model.d_compressed 512
    llm-trm fit --config configs/phase1/stage1a.yaml --trainer.devices 8 --trainer.strategy ddp \
        --trainer.precision bf16-mixed

Errors a user can fix (LLMTRMError) are printed as one line; set LLM_TRM_DEBUG=1 for the traceback.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence

from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningCLI

from llm_trm.errors import ConfigMismatchError, LLMTRMError
from llm_trm.models.pretrained import load_torch_checkpoint

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

    def _parse_ckpt_path(self) -> None:
        # Lightning replaces the model's config with the checkpoint's hyperparameters when resuming;
        # first make sure the user did not configure a different backbone / layer / D'.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and os.path.isfile(ckpt_path):
            saved = load_torch_checkpoint(ckpt_path).get("hyper_parameters", {})
            configured = self.config[subcommand].get("model", {}).get("init_args") or {}
            for key in IDENTITY_INIT_ARGS:
                if key in saved and key in configured and saved[key] != configured[key]:
                    raise ConfigMismatchError(
                        f"{ckpt_path} was trained with {key}={saved[key]!r} but this run has "
                        f"{key}={configured[key]!r}: resume with the same {key} or start a new run."
                    )
        super()._parse_ckpt_path()

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
    """The LLMTRMError behind `err`, if any: jsonargparse wraps errors raised while it instantiates classes."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, LLMTRMError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
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
