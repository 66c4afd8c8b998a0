"""The run-folder files of a grpo/dpo/simpo/ppo stage: train.json (RLConfig) and ds_config.json, and for
GRPO and PPO a copy of every reward file (the run keeps the code it was trained with; train.json points there)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from clusterctl.run import Run
from clusterctl.spec import JobSpec
from clusterctl.training.rl.config import RLConfig
from clusterctl.training.rl.rewards import parse_spec

REWARD_KINDS = ("grpo", "ppo")      # the kinds whose section names reward files


def copied_rewards(rewards: list[str], stage_dir: Path) -> tuple[list[str], dict[str, str]]:
    """The reward specs as the nodes see them (files copied under `<stage>/rewards/`), and those copies
    as {path relative to the stage folder: text}. Module rewards (`package.module:func`) stay as they are."""
    specs, files = [], {}
    for i, text in enumerate(rewards):
        spec = parse_spec(text, f"grpo.rewards[{i}]")
        if spec.is_file:
            name = f"rewards/{i:02d}_{Path(spec.source).name}"
            files[name] = Path(spec.source).read_text()
            specs.append(f"{stage_dir / name}:{spec.function}")
        else:
            specs.append(text)
    return specs, files


def rl_config(job: JobSpec, run: Run, stage: str) -> RLConfig:
    stage_dir = run.stage_dir(stage)
    config = getattr(job, stage).rl_config(stage, model=job.model, data=job.data, stage_dir=stage_dir)
    if stage in REWARD_KINDS:
        section = getattr(config, stage)
        section.rewards, _ = copied_rewards(section.rewards, stage_dir)
    return config


def stage_files(job: JobSpec, run: Run, stage: str) -> dict[str, str]:
    config = rl_config(job, run, stage)
    files = {f"{stage}/train.json": config.to_json(),
             f"{stage}/ds_config.json": json.dumps(config.ds_config(), indent=2) + "\n"}
    if stage in REWARD_KINDS:
        _, copies = copied_rewards(getattr(job, stage).rewards, run.stage_dir(stage))
        files.update({f"{stage}/{name}": text for name, text in copies.items()})
    return files


def stage_spec(job: JobSpec, run: Run, stage: str) -> dict:
    return dataclasses.asdict(rl_config(job, run, stage))
