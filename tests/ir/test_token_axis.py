"""What fixes a graph's token count, read from the graph: why token passes refuse a model they cannot act on."""

import functools

import pytest
import torch
from torch import nn

from evc.ir.program import Program
from evc.ir.token_axis import token_count_fixed, token_stream
from evc.ir.view import RecognitionError
from evc.spec.plan import ImageInput
from tests.zoo import ZOO


@functools.cache
def program_of(name: str) -> Program:
    model, size, output = ZOO[name]()
    return Program.from_module(model, ImageInput(size, size), output=output)


@pytest.mark.parametrize(("name", "reason"), [
    ("twins_pcpvt", "node 'view' reshapes the 256 tokens of (1, 16, 256) into (1, 16, 16, 16): a grid or windows"),
    ("hf_swinv2", "reshapes the 64 tokens of (1, 64, 16) into (1, 8, 8, 16)"),
    ("poolformerv2", "the residual stream at node 'add' has shape (1, 16, 16, 16), not (batch, tokens, channels)"),
    ("features_only", "the model's output at node 'contiguous' is a map of shape (1, 64, 4, 4)"),
])
def test_the_node_that_fixes_the_token_count_is_named(name, reason):
    assert program_of(name).structure is None
    assert reason in token_count_fixed(program_of(name).graph)


class TableAttention(nn.Module):
    """A two-block token mixer whose second block adds a learned bias per token pair (relative positions)."""

    def __init__(self, tokens=16, dim=8):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, 4)
        self.mix1, self.mix2 = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.bias = nn.Parameter(torch.randn(tokens, tokens))
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = x + self.mix1(x).softmax(dim=1)
        x = x + (x @ x.transpose(1, 2) + self.bias).softmax(dim=-1) @ self.mix2(x)
        return self.head(x.mean(dim=1))


def test_a_table_per_token_pair_fixes_the_count_and_the_pass_says_so():
    program = Program.from_module(TableAttention().eval(), ImageInput(16, 16))
    assert program.structure is None
    with pytest.raises(RecognitionError, match="pass patch_slim cannot change this model's token count: node 'bias' "
                                               r"reads 'bias' of shape \(16, 16\), a table with an entry per token"):
        token_stream(program, "pass patch_slim")


def test_a_parallel_block_vit_is_a_free_token_stream_read_from_its_graph():
    program = program_of("parallel_vit")
    assert program.structure is None and token_count_fixed(program.graph) is None
    stream = token_stream(program, "pass patch_slim")
    assert (stream.prefix, stream.dim) == (1, 64)
    assert [(b.tokens, len(b.scores)) for b in stream.blocks] == [(17, 2), (17, 2)]  # two attentions side by side
    assert stream.blocks[0].entry is None and stream.blocks[1].entry is not None
