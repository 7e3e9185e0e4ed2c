"""The "Adding a backbone" and "Adding a method" blocks of docs/extending.md, run as user
modules, and the `runlocal` variant of every recipe, each trained for a few steps."""

import sys

import jax
import numpy as np
import pytest
from helpers import doc_block

from configs import quickstart, seco, softcon
from softcon_jax import interop, models, train

@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """Writes a docs block as a module `name` on sys.path, as a user's file would be."""
    def write(name: str, section: str) -> str:
        (tmp_path / f"{name}.py").write_text(doc_block("docs/extending.md", section))
        monkeypatch.syspath_prepend(str(tmp_path))
        return name
    yield write
    for name in ("readme_backbone", "readme_method"):
        sys.modules.pop(name, None)


def _quick_config(tmp_path, **changes):
    c = quickstart.get_config("test")
    c.unlock()
    c.data.path = str(tmp_path / "data")
    c.total_steps = 2
    c.checkpoint.every_steps = 2
    c.checkpoint.async_save = False
    for key, value in changes.items():
        c[key] = value
    return c


def test_readme_backbone_trains_and_round_trips_through_pytorch(tmp_path, user_module):
    c = _quick_config(tmp_path, imports=(user_module("readme_backbone", "Adding a backbone"),))
    c.model.backbone = "tiny_convnet"
    c.model.backbone_kwargs = {"width": 16}
    state = train.train(c, str(tmp_path / "w"), devices=jax.devices()[:1])
    assert int(state.step) == 2
    model = models.build_backbone("tiny_convnet", in_channels=13, width=16)
    variables = {"params": jax.device_get(state.model_state["teacher"]["params"]["backbone"])}
    path = tmp_path / "tiny.safetensors"
    sidecar = interop.export_torch(model, variables, path)
    assert sidecar["timm_name"] == "tiny_convnet" and sidecar["num_features"] == 16
    _, again = interop.import_torch(path, "tiny_convnet", 13, width=16)
    np.testing.assert_array_equal(again["params"]["stem"]["kernel"],
                                  variables["params"]["stem"]["kernel"])
    # Another band count: the layout's first layer is re-initialised, the rest kept.
    _, two = interop.import_torch(path, "tiny_convnet", 2, width=16)
    assert two["params"]["stem"]["kernel"].shape == (3, 3, 2, 16)
    np.testing.assert_array_equal(two["params"]["stem"]["bias"],
                                  variables["params"]["stem"]["bias"])


def test_readme_method_trains_on_its_own_views(tmp_path, user_module):
    c = _quick_config(tmp_path, imports=(user_module("readme_method", "Adding a method"),),
                      method="softcon_same_season")
    state = train.train(c, str(tmp_path / "w"), devices=jax.devices()[:1])
    assert int(state.step) == 2 and int(state.num_nonfinite) == 0
    from softcon_jax import data
    views_cls = data.VIEWS.get("same_season")
    assert sys.modules["readme_method"].SoftConSameSeason.views is views_cls
    # The views really come from one season: both labels rows are equal.
    ds = data.build_dataset(c.data, global_batch_size=8, seed=0, views=views_cls)
    batch = next(iter(ds))
    np.testing.assert_array_equal(batch["labels1"], batch["labels2"])


@pytest.mark.parametrize("module,arg", [(softcon, "vits14,s2c,runlocal"),
                                        (seco, "rn18,runlocal")])
def test_runlocal_recipes_train_a_few_steps_on_cpu(tmp_path, module, arg):
    c = module.get_config(arg)
    full = module.get_config(arg.replace(",runlocal", ""))
    # Everything but the sizes is the recipe's.
    for key in ("method", "loss.name", "optimizer.name", "schedule.name", "data.normalization"):
        a, b = c, full
        for part in key.split("."):
            a, b = a[part], b[part]
        assert a == b, key
    c.data.path = str(tmp_path / "data")
    state = train.train(c, str(tmp_path / "w"))
    assert int(state.step) == c.total_steps and int(state.num_nonfinite) == 0
