"""Hugging Face interop: weight conversion, loading local HF directories, and exports for serving
engines (transformers directory for the full model, EAGLE-1 draft for vLLM / SGLang)."""

from .convert import (
    SUPPORTED_MODEL_TYPES,
    from_hf_model,
    from_hf_state_dict,
    hf_config_dict,
    hf_config_from_model_config,
    hf_to_native_name,
    model_config_from_hf,
    native_to_hf_name,
    to_hf_model,
    to_hf_state_dict,
)
from .export import (
    APPROXIMATION_NOTE,
    check_module_fits,
    eagle_config,
    eagle_state_dict,
    export_eagle,
    export_hf,
    serving_command,
    serving_commands,
)
from .load import load_hf_model_dir

__all__ = [
    "APPROXIMATION_NOTE",
    "SUPPORTED_MODEL_TYPES",
    "check_module_fits",
    "eagle_config",
    "eagle_state_dict",
    "export_eagle",
    "export_hf",
    "from_hf_model",
    "from_hf_state_dict",
    "hf_config_dict",
    "hf_config_from_model_config",
    "hf_to_native_name",
    "load_hf_model_dir",
    "model_config_from_hf",
    "native_to_hf_name",
    "serving_command",
    "serving_commands",
    "to_hf_model",
    "to_hf_state_dict",
]
