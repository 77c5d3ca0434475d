"""lokr-diffusion: LoKr (and LoHa/LoRA) adapters for Stable Diffusion, in the LyCORIS layout."""
from .algos import ALGORITHMS, ModuleSettings
from .embeddings import TriggerEmbedding, load_embedding, unload_embedding
from .errors import AdapterFileError, ConfigError, DatasetError, LokrDiffusionError, ModelError, OutputError
from .fileformat import read_safetensors, write_safetensors
from .kron import factorization, kron
from .layers import AdapterModule
from .loading import LoadReport, init_from_file, load_network, network_from_tensors
from .families import FAMILIES, Family, family_of_pipeline, get_family
from .network import AdapterConfig, AdapterNetwork, create_network
from .pipelines import fuse_adapter, list_adapters, load_adapter, set_adapter_scale, unfuse_adapter, unload_adapter
from .diffusers_api import use_diffusers_api

__version__ = "0.1.0"

__all__ = [
    "ALGORITHMS", "AdapterConfig", "AdapterFileError", "AdapterModule", "AdapterNetwork", "ConfigError",
    "DatasetError", "LoadReport", "OutputError", "LokrDiffusionError", "ModelError", "ModuleSettings", "create_network",
    "FAMILIES", "Family", "family_of_pipeline", "get_family", "factorization", "kron", "init_from_file", "load_network", "network_from_tensors", "read_safetensors",
    "write_safetensors", "fuse_adapter", "list_adapters", "load_adapter", "set_adapter_scale", "unfuse_adapter",
    "unload_adapter", "TriggerEmbedding", "load_embedding", "unload_embedding", "use_diffusers_api",
]
