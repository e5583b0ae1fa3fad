"""The IR: an FX GraphModule and the transformer structure recognised in it."""

from evc.ir.macs import Summary, node_macs, params_of, summarize
from evc.ir.recognise import RecognitionError, recognise
from evc.ir.structure import Attention, Block, Mlp, Structure
from evc.ir.trace import trace

__all__ = [
    "Attention",
    "Block",
    "Mlp",
    "RecognitionError",
    "Structure",
    "Summary",
    "node_macs",
    "params_of",
    "recognise",
    "summarize",
    "trace",
]
