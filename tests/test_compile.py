"""``compile=true`` compiles each model whole: every tiny tokenizer and image prior traces its
training forward with torchdynamo without a graph break (a break splits the compiled graph and,
where it comes from reading a value, is also a host sync). The text-conditional prior is left out: its
shapes depend on the data (the text cut to the batch's longest caption, caption dropout drawn on
the host; ``model_zoo/t2i_prior.py``), which breaks the graph where those values are read."""

from __future__ import annotations

import pytest
import torch

from model_zoo.registry import create_model, list_models, model_entry

NAMES = [n for n in list_models(tiny=True) if model_entry(n).kind in ("tokenizer", "prior") and not n.startswith("t2i")]


@pytest.mark.parametrize("name", NAMES)
def test_the_training_forward_traces_without_graph_breaks(name):
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = create_model(name).train()
    if model_entry(name).kind == "tokenizer":
        args, kwargs = (torch.randn(2, 3, model.image_size, model.image_size),), {}
    else:
        codes = torch.randint(0, model.codebook_size, (2, model.num_tokens))
        args, kwargs = (codes, model.null_condition(2)), {}
        if name.startswith("stackformer"):
            kwargs["positions"] = torch.arange(model.num_tokens).expand(2, -1)
    explained = torch._dynamo.explain(model)(*args, **kwargs)
    assert explained.graph_break_count == 0, [str(b.reason).splitlines()[0] for b in explained.break_reasons]
    assert explained.graph_count == 1


def test_class_labels_are_checked_inside_a_compiled_graph():
    model = torch.compile(create_model("vim-small-tiny"), backend="eager")
    codes = torch.randint(0, model.codebook_size, (2, model.num_tokens))
    model(codes, torch.tensor([1, 2]))
    with pytest.raises(RuntimeError, match="labels must be in"):
        model(codes, torch.tensor([1, 99]))
