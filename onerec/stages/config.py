"""`onerec config --config FILE [key=value ...]`: print the resolved config as YAML and exit.

The same resolution every stage uses (defaults < YAML < overrides, ranges checked), so a
misspelt key or an out-of-range value fails here exactly as it would at the start of a run.
"""

from __future__ import annotations

from omegaconf import OmegaConf

from onerec.config import RootConfig, to_dict


def main(cfg: RootConfig) -> str:
    text = OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg)))
    print(text, end="")
    return text
