"""One config system for everything: packaged recipes (distcluster/recipes/*.yaml),
`--set section.key=value` on the command line and Ray Tune search spaces all address the
same dotted keys, e.g. `optim.lr` or `imc_swav.temperature`.
"""

from distcluster.config.building import apply_override, assign, from_dict, merge
from distcluster.config.recipes import (
    MAX_YAML_ALIASES,
    MAX_YAML_BYTES,
    default_recipe,
    load_recipe,
    read_text_file,
    recipe_names,
    safe_yaml,
)
from distcluster.config.resume import ResumeChanges, resume_changes
from distcluster.config.schema import (
    MAX_CLUSTERS,
    OBJECTIVES,
    Config,
    OptimConfig,
    SpeedConfig,
    check_model_name,
)

__all__ = [
    "MAX_CLUSTERS", "MAX_YAML_ALIASES", "MAX_YAML_BYTES", "OBJECTIVES", "Config", "OptimConfig",
    "ResumeChanges",
    "SpeedConfig", "apply_override", "assign", "check_model_name", "default_recipe", "from_dict",
    "load_recipe", "merge", "read_text_file", "recipe_names", "resume_changes", "safe_yaml",
]
