"""The one tensor a captured model returns, whatever the model itself returns."""

import pytest
import torch
from torch import nn

from evc.errors import InputError
from evc.ir.trace import trace


class Named(nn.Module):
    def __init__(self, returns="dict"):
        super().__init__()
        self.body, self.head = nn.Linear(4, 6), nn.Linear(6, 3)
        self.returns = returns

    def forward(self, x):
        features = self.body(x)
        logits = self.head(features)
        return {"logits": logits, "features": features} if self.returns == "dict" else (features, logits)


x = torch.randn(2, 4)


def test_a_dict_gives_its_logits_by_default():
    model = Named()
    torch.testing.assert_close(trace(model, x)(x), model(x)["logits"])


class Depth(nn.Module):
    """A dense model's ModelOutput: one map, the other fields None (Hugging Face DPT's predicted_depth)."""

    def forward(self, x):
        return {"loss": None, "predicted_depth": x * 2, "hidden_states": None}


def test_an_output_holding_one_tensor_gives_it_without_a_name():
    torch.testing.assert_close(trace(Depth(), x)(x), x * 2)


def test_output_names_another_entry():
    model = Named()
    torch.testing.assert_close(trace(model, x, output="features")(x), model(x)["features"])


def test_a_tuple_gives_its_first_element():
    model = Named("tuple")
    torch.testing.assert_close(trace(model, x)(x), model(x)[0])


def test_an_entry_the_model_lacks_names_what_it_returns():
    with pytest.raises(InputError, match="output = \"probs\": model 'Named' returns no 'probs'; it returns "
                                         "'logits', 'features'"):
        trace(Named(), x, output="probs")


def test_output_on_a_model_returning_one_tensor_is_an_error():
    with pytest.raises(InputError, match="output = \"logits\": model 'Linear' returns one tensor"):
        trace(nn.Linear(4, 3), x, output="logits")
