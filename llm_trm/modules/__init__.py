"""LightningModules: training logic around the pure models in `llm_trm.models`."""

from llm_trm.modules.bridge import BridgeModule
from llm_trm.modules.compressor import CompressorModule
from llm_trm.modules.export import ExportBestModel
from llm_trm.modules.trm import TRMModule

__all__ = ["BridgeModule", "CompressorModule", "ExportBestModel", "TRMModule"]
