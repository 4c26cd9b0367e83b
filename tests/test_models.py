"""Model shapes, feature dimensions and the named outputs every other module relies on."""
import jax
import jax.numpy as jnp
import ml_collections
import pytest

from contrastood import models


def model_config(name, width=1, dtype="float32"):
    return ml_collections.ConfigDict(dict(name=name, width=width, proj_dim=16, proj_hidden_dim=0, dtype=dtype))


@pytest.mark.parametrize("name,width,dim", [("resnet_tiny", 1, 64), ("resnet_tiny", 2, 128),
                                            ("resnet18", 1, 512), ("resnet50", 1, 2048)])
def test_named_outputs_and_feature_dim(name, width, dim):
    model = models.create_model(model_config(name, width), num_classes=7)
    assert models.feature_dim(model) == dim
    x = jnp.zeros((2, 32, 32, 3))
    shapes = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), x, train=False)[0])
    assert shapes["pre_logits"].shape == (2, dim)
    assert shapes["proj"].shape == (2, 16)
    assert shapes["logits"].shape == (2, 7)


def test_resnet50x3_has_paper_feature_dim():
    assert models.feature_dim(models.create_model(model_config("resnet50", 3), 10)) == 6144


def test_bfloat16_compute_keeps_float32_params_and_outputs():
    model = models.create_model(model_config("resnet_tiny", dtype="bfloat16"), num_classes=3)
    x = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3))
    out, variables = model.init_with_output(jax.random.key(0), x, train=False)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables["params"]))
    assert all(v.dtype == jnp.float32 for v in out.values())


def test_bad_names_and_inputs_raise():
    with pytest.raises(ValueError, match="model.name"):
        models.create_model(model_config("resnet101"), 10)
    model = models.create_model(model_config("resnet_tiny"), 10)
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        model.init(jax.random.key(0), jnp.zeros((2, 32, 32)))


def test_model_loss_augment_and_scoring_code_import_without_tensorflow():
    """Only the input pipeline may import TensorFlow (design rule; boxes without TF must score)."""
    import subprocess
    import sys

    code = ("import sys\n"
            "import contrastood.models, contrastood.losses, contrastood.augment, contrastood.parallel\n"
            "import contrastood.config_lib, contrastood.ood.scorers, contrastood.ood.metrics\n"
            "import contrastood.ood.clp, contrastood.ood.plots\n"
            "print('tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
