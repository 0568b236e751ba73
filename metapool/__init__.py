"""metapool: Progressive Meta-Pooling Learning (PMPL), reproduced and ablated.

Importing the package registers the ``metapool_*`` models with timm.
"""
from metapool.enhancer import FixedEnhancer, MetaPoolEnhancer
from metapool.genotype import Genotype, LayerChoice
from metapool.models import build_model, enhancers, export_fixed

__all__ = [
    "FixedEnhancer",
    "Genotype",
    "LayerChoice",
    "MetaPoolEnhancer",
    "build_model",
    "enhancers",
    "export_fixed",
]
__version__ = "0.1.0"
