"""Where each stage reads and writes, relative to `run.out_dir` (one place, so stages never guess)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @classmethod
    def of(cls, out_dir: str | Path) -> "RunPaths":
        return cls(Path(out_dir))

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def semantic_ids(self) -> Path:
        return self.root / "semantic_ids"

    @property
    def pretrain(self) -> Path:
        return self.root / "pretrain"

    @property
    def export(self) -> Path:
        return self.pretrain / "export"

    @property
    def reward(self) -> Path:
        return self.root / "reward"

    @property
    def dpo(self) -> Path:
        return self.root / "dpo"

    @property
    def dpo_export(self) -> Path:
        return self.dpo / "export"

    @property
    def baselines(self) -> Path:
        return self.root / "baselines"

    @property
    def sasrec(self) -> Path:
        return self.baselines / "sasrec"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def resolved_config(self) -> Path:
        return self.root / "config.yaml"

    def require(self, path: Path, producer: str) -> Path:
        """Fail with the command that makes `path` when an earlier stage has not run."""
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: run `onerec {producer}` with the same run.out_dir first")
        return path


def save_resolved_config(cfg) -> Path:
    """Write the resolved config to <out>/config.yaml (atomically): what this run was told."""
    from omegaconf import OmegaConf

    from onerec.config import to_dict

    paths = RunPaths.of(cfg.run.out_dir)
    paths.root.mkdir(parents=True, exist_ok=True)
    tmp = paths.resolved_config.with_suffix(".yaml.tmp")
    tmp.write_text(OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg))), encoding="utf-8")
    tmp.replace(paths.resolved_config)
    return paths.resolved_config
