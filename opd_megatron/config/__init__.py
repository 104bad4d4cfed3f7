"""Typed run configuration: dataclasses, YAML loading, dotted command-line overrides, validation.

A run config is a tree of dataclasses (`RunConfig`, one field per section). It is built from a YAML file (or
nothing: every field has a default) and then `key.path=value` overrides from the command line, e.g.

    opd-megatron train --config configs/sft_tiny.yaml parallel.tp=2 optim.lr=1e-4

Every key is checked: an unknown key is a `ConfigError` that names it and suggests the nearest valid key; a key that
moved (`loader.MOVED_KEYS`) names its new place; a value of the wrong type or out of range is a `ConfigError` that
says what was expected. Validation that needs the world size (tp x pp dividing it) runs in
`validate_for_world(world_size)`, before any model is built.

Modules: `loader.py` (the generic typed loader and the table of moved keys), `presets.py` (model shapes),
`sections.py` (run, model, parallel, data, optim, checkpoint, logging, rollout, eval, quickstart), `teacher.py`,
`opd.py`, `run.py` (`RunConfig`, the cross-section rules, `load_config`). Config imports the math configs it
uses as fields (math/ imports nothing of the package) and nothing else of the package: the parts import config,
never the reverse.
"""

from opd_megatron.config.loader import MOVED_KEYS, ConfigError
from opd_megatron.config.opd import (CreditSection, MixturesSection, OpdSection, PolicyGradientSection,
                                     RegularizersSection, RouteASection)
from opd_megatron.config.presets import MODEL_PRESETS
from opd_megatron.config.run import RunConfig, from_dict, load_config
from opd_megatron.config.sections import (CheckpointSection, DataSection, EvalSection, LoggingSection, ModelSection,
                                          OptimSection, ParallelSection, QuickstartSection, RolloutSection,
                                          RopeScalingSection, RunSection)
from opd_megatron.config.teacher import (ColocatedTeacherSection, InProcessTeacherSection, MultiTeacherSection,
                                         SelfTeacherSection, ServerSection, TeacherMemberSection, TeacherSection)

__all__ = [
    "MODEL_PRESETS", "MOVED_KEYS", "CheckpointSection", "ColocatedTeacherSection", "ConfigError", "CreditSection",
    "DataSection", "EvalSection", "InProcessTeacherSection", "LoggingSection", "MixturesSection", "ModelSection",
    "MultiTeacherSection", "OpdSection", "OptimSection", "ParallelSection", "PolicyGradientSection",
    "QuickstartSection", "RegularizersSection", "RolloutSection", "RopeScalingSection", "RouteASection", "RunConfig", "RunSection",
    "SelfTeacherSection", "ServerSection", "TeacherMemberSection", "TeacherSection", "from_dict", "load_config",
]
