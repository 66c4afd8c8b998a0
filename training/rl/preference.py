"""DPO and SimPO on the nodes: TRL's DPOTrainer (a frozen reference copy of the model) and CPOTrainer
with loss_type simpo and cpo_alpha 0 (SimPO: length-normalised, no reference), under the SFT launcher.

    torchrun ... -m clusterctl.training.rl.preference --config dpo/train.json

Data: JSONL of {prompt, chosen, rejected}, each a string or a message list (one form per file);
`clusterctl data check FILE --kind dpo` reports every bad line before a run.
"""
from __future__ import annotations

from clusterctl.training.rl import runner
from clusterctl.training.rl.config import RLConfig

DEFAULT_BETA = {"dpo": 0.1, "simpo": 2.0}


def preference_arguments(cfg: RLConfig) -> dict:
    """DPOConfig / CPOConfig keyword arguments for this job."""
    p = cfg.preference
    values = dict(runner.training_arguments(cfg), beta=p.beta or DEFAULT_BETA[cfg.kind], max_length=cfg.max_length,
                  label_smoothing=p.label_smoothing)
    if cfg.kind == "dpo":
        values.update(loss_type=[p.loss_type])
    else:
        values.update(loss_type="simpo", cpo_alpha=0.0, simpo_gamma=p.gamma)
    return values


def load_pairs(path: str):
    from datasets import load_dataset

    from clusterctl.training.rl.data import columns_of

    columns_of(path, "dpo", where=path)
    return load_dataset("json", data_files=path, split="train")


def build(cfg: RLConfig):
    from transformers import AutoTokenizer

    from clusterctl.training.rl.data import resolve_data

    base = runner.prepare_model(cfg)
    if cfg.kind == "dpo":
        from trl import DPOConfig as Config
        from trl import DPOTrainer as Base
    else:
        from trl.experimental.cpo import CPOConfig as Config
        from trl.experimental.cpo import CPOTrainer as Base
    args = Config(**preference_arguments(cfg))

    class Trainer(runner.ZeroCheckpoints, Base):
        pass

    return Trainer(model=runner.load_model(base, cfg), args=args, processing_class=AutoTokenizer.from_pretrained(base),
                   train_dataset=load_pairs(resolve_data(cfg.data)))


def main(argv: list[str] | None = None) -> int:
    return runner.run_main(build, argv, "python -m clusterctl.training.rl.preference")


if __name__ == "__main__":
    from clusterctl.training.sft import exit_now

    exit_now(main())
