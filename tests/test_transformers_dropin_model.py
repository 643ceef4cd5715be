"""Drop-in for transformers at the model's edges: mask dtypes, tuple outputs, attention weights, config defaults,
and the training hooks that peft, TRL and the Trainer call. transformers (fp32, eager) is the oracle throughout."""
from __future__ import annotations

import contextlib

import pytest
import torch
import transformers

import oracle
from conftest import IMAGE, randomize, tiny_config
from test_parity import CASES, compat_mode, make_inputs
from mllama import (MllamaForCausalLM, MllamaForConditionalGeneration, MllamaModel, MllamaTextModel,
                    MllamaVisionModel)
from mllama.weights import CheckpointError

TOL = 1e-5


@pytest.fixture(scope="module")
def pair():
    ours = randomize(MllamaForConditionalGeneration.from_config(tiny_config()), seed=3).eval()
    return ours, oracle.hf_model(ours)


def _fixes(mode):
    return oracle.meta_fixes() if mode == "meta" else contextlib.nullcontext()


def _max_diff(a, b):
    if isinstance(a, torch.Tensor):
        return (a - b).abs().max().item()
    assert type(a) is type(b) is tuple and len(a) == len(b), (type(a), type(b))
    return max(_max_diff(x, y) for x, y in zip(a, b))


# ---------------------------------------------------------------------------------------------------------------
# The forward

@pytest.mark.parametrize("mode", ["meta", "transformers"])
@pytest.mark.parametrize("case", ["text_before_image", "padded_batch", "interleaved"])
def test_float_per_tile_cross_attention_mask_gives_the_int_logits(pair, case, mode):
    ours, theirs = pair
    inputs = make_inputs(*CASES[case], 28)
    as_float = dict(inputs, cross_attention_mask=inputs["cross_attention_mask"].float())
    with torch.no_grad(), compat_mode(ours, mode), _fixes(mode):
        ints = ours(**inputs).logits
        floats = ours(**as_float).logits
        reference = theirs(**as_float).logits
    assert torch.equal(floats, ints)
    assert _max_diff(floats, reference) <= TOL * reference.abs().max().item()


def test_float_mask_on_a_decode_step(pair):
    """One row of a float mask [B, 1, N, T] on a cached step (shape [B, 1, ...] like a prepared mask's)."""
    ours, _ = pair
    inputs = make_inputs(*CASES["interleaved"], 28)
    with torch.no_grad():
        steps = []
        for dtype in (torch.long, torch.float32):
            out = ours(**dict(inputs, cross_attention_mask=inputs["cross_attention_mask"].to(dtype)), use_cache=True)
            length = inputs["input_ids"].shape[1]
            step = ours(input_ids=torch.tensor([[7]]), attention_mask=torch.ones(1, length + 1, dtype=torch.long),
                        cross_attention_mask=inputs["cross_attention_mask"][:, -1:].to(dtype), cache=out.cache)
            steps.append(step.logits)
    assert torch.equal(steps[0], steps[1])


@pytest.mark.parametrize("use_cache", [False, True])
def test_return_dict_false_gives_transformers_tuple(pair, use_cache):
    ours, theirs = pair
    inputs = make_inputs(*CASES["text_before_image"], 28)
    with torch.no_grad(), oracle.meta_fixes():
        a = ours(**inputs, use_cache=use_cache, return_dict=False)
        b = theirs(**inputs, use_cache=use_cache, return_dict=False)
        whole = ours(**inputs, use_cache=use_cache)
    assert type(a) is tuple and len(a) == len(b)
    assert [type(x).__name__ == "DynamicCache" or type(x) for x in b] == \
        [type(x).__name__ == "MllamaCache" or type(x) for x in a]
    tensors = [(x, y) for x, y in zip(a, b) if isinstance(x, (torch.Tensor, tuple))]
    assert tensors and all(_max_diff(x, y) <= TOL for x, y in tensors)  # logits and the vision features
    # the output object indexes and slices like transformers' ModelOutput
    assert whole[:2][0] is whole.logits and len(whole[:2]) == 2 and whole[-1] == whole.to_tuple()[-1]


def test_return_dict_false_for_every_class(pair):
    ours, _ = pair
    inputs = make_inputs(*CASES["text_before_image"], 28)
    vision = {k: inputs[k] for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")}
    lm = MllamaForCausalLM(ours.config.text_config).eval()
    text = {"input_ids": inputs["input_ids"]}
    with torch.no_grad():
        for model, kwargs in ((ours.model, inputs), (ours.model.language_model, text), (lm, text),
                              (ours.model.vision_model, vision)):
            out = model(**kwargs, use_cache=False, return_dict=False)
            assert type(out) is tuple and torch.equal(out[0], model(**kwargs, use_cache=False)[0])


@pytest.mark.parametrize("mode", ["meta", "transformers"])
@pytest.mark.parametrize("case", ["text_before_image", "padded_batch", "interleaved", "text_only"])
def test_output_attentions_equal_transformers_eager(pair, case, mode):
    ours, theirs = pair
    inputs = make_inputs(*CASES[case], 28)
    with torch.no_grad(), compat_mode(ours, mode), _fixes(mode):
        a = ours(**inputs, output_attentions=True)
        b = theirs(**inputs, output_attentions=True)
        plain = ours(**inputs)
    assert a.attentions is not None and len(a.attentions) == len(b.attentions)
    assert [x.shape for x in a.attentions] == [y.shape for y in b.attentions]
    assert _max_diff(a.attentions, b.attentions) <= TOL
    # asking for the weights does not change the answer (the default path stays SDPA)
    assert _max_diff(a.logits, plain.logits) <= TOL and plain.attentions is None


def test_output_attentions_on_a_decode_step(pair):
    """The prefill asks for the weights too: it then keeps every tile (a plain Meta-mode prefill drops the tiles no
    row sees, and later steps' cross weights cover the kept tiles only)."""
    ours, theirs = pair
    inputs = make_inputs(*CASES["interleaved"], 28)
    length = inputs["input_ids"].shape[1]
    step = dict(input_ids=torch.tensor([[7]]), attention_mask=torch.ones(1, length + 1, dtype=torch.long),
                cross_attention_mask=inputs["cross_attention_mask"][:, -1:], position_ids=torch.tensor([[length]]))
    with torch.no_grad(), oracle.meta_fixes():
        a = ours(**step, cache=ours(**inputs, use_cache=True, output_attentions=True).cache, output_attentions=True)
        b = theirs(**step, cache=theirs(**inputs, use_cache=True).cache, output_attentions=True)
    assert [x.shape for x in a.attentions] == [y.shape for y in b.attentions]
    assert a.attentions[0].shape[-1] == length + 1
    assert _max_diff(a.attentions, b.attentions) <= TOL


def test_causal_lm_output_attentions(pair):
    ours, _ = pair
    lm = oracle.causal_lm_of(ours)
    theirs = oracle.hf_model(lm, "MllamaForCausalLM")
    inputs = make_inputs(*CASES["text_only"], 28)
    with torch.no_grad():
        a, b = lm(**inputs, output_attentions=True), theirs(**inputs, output_attentions=True)
    assert len(a.attentions) == len(b.attentions) == 4 and _max_diff(a.attentions, b.attentions) <= TOL


@pytest.mark.parametrize("case", ["text_before_image", "text_only"])
def test_config_output_hidden_states_and_attentions_are_defaults(pair, case):
    ours, theirs = pair
    inputs = make_inputs(*CASES[case], 28)
    try:
        for config in (ours.config.text_config, theirs.config.text_config):
            config.output_hidden_states = config.output_attentions = True
        with torch.no_grad(), oracle.meta_fixes():
            a, b = ours(**inputs), theirs(**inputs)
            explicit = ours(**inputs, output_hidden_states=False, output_attentions=False)
    finally:
        for config in (ours.config.text_config, theirs.config.text_config):
            config.output_hidden_states = config.output_attentions = False
    assert len(a.hidden_states) == len(b.hidden_states) and _max_diff(a.hidden_states, b.hidden_states) <= TOL
    assert len(a.attentions) == len(b.attentions) and _max_diff(a.attentions, b.attentions) <= TOL
    assert explicit.hidden_states is None and explicit.attentions is None  # the argument wins over the config
    # the composite config is read too
    ours.config.output_hidden_states = True
    try:
        with torch.no_grad():
            assert len(ours(**inputs).hidden_states) == len(b.hidden_states)
    finally:
        del ours.config.output_hidden_states


@pytest.mark.parametrize("key", ["use_return_dict", "return_dict"])
def test_config_return_dict_false_gives_tuples(pair, key):
    ours, _ = pair
    inputs = make_inputs(*CASES["text_before_image"], 28)
    setattr(ours.config, key, False)
    try:
        with torch.no_grad():
            out = ours(**inputs, use_cache=False)
            forced = ours(**inputs, use_cache=False, return_dict=True)
    finally:
        delattr(ours.config, key)
    assert type(out) is tuple and torch.equal(out[0], forced.logits)


# ---------------------------------------------------------------------------------------------------------------
# Training hooks

def _train_step(model, inputs, labels):
    model.zero_grad(set_to_none=True)
    loss = model(**inputs, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kwargs", [None, {"use_reentrant": True}])
def test_gradient_checkpointing_gives_the_same_gradients(kwargs, monkeypatch):
    model = randomize(MllamaForConditionalGeneration.from_config(tiny_config()), seed=4).train()
    inputs = make_inputs(*CASES["padded_batch"], 28)
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == IMAGE, -100)
    loss, grads = _train_step(model, inputs, labels)

    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint",
                        lambda fn, *a, **k: calls.append(k) or real(fn, *a, **k))
    assert model.supports_gradient_checkpointing and not model.is_gradient_checkpointing
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    assert model.is_gradient_checkpointing
    loss_ckpt, grads_ckpt = _train_step(model, inputs, labels)
    layers = len(model.model.language_model.layers) + len(model.model.vision_model.transformer.layers) \
        + len(model.model.vision_model.global_transformer.layers)
    assert len(calls) == layers  # every decoder layer and every vision layer, each once
    assert all(k["use_reentrant"] == (kwargs or {"use_reentrant": False})["use_reentrant"] for k in calls)
    assert torch.equal(loss, loss_ckpt) and grads.keys() == grads_ckpt.keys()
    assert all(torch.allclose(grads[n], grads_ckpt[n], rtol=1e-5, atol=1e-7) for n in grads)

    model.gradient_checkpointing_disable()
    calls.clear()
    _train_step(model, inputs, labels)
    assert not calls and not model.is_gradient_checkpointing
    with torch.no_grad():  # and in eval mode a cache works again
        assert model.eval()(**inputs, use_cache=True).cache.get_seq_length() == inputs["input_ids"].shape[1]


def test_gradient_checkpointing_with_attentions_and_hidden_states():
    model = randomize(MllamaForConditionalGeneration.from_config(tiny_config()), seed=4).train()
    inputs = make_inputs(*CASES["interleaved"], 28)
    plain = model(**inputs, output_attentions=True, output_hidden_states=True)
    model.gradient_checkpointing_enable()
    ckpt = model(**inputs, output_attentions=True, output_hidden_states=True)
    assert len(ckpt.attentions) == len(plain.attentions) == 6
    assert _max_diff(ckpt.attentions, plain.attentions) == 0 and _max_diff(ckpt.hidden_states,
                                                                            plain.hidden_states) == 0
    ckpt.logits.sum().backward()


def test_enable_input_require_grads_for_frozen_models():
    model = randomize(MllamaForConditionalGeneration.from_config(tiny_config()), seed=4)
    model.requires_grad_(False)
    inputs = make_inputs(*CASES["text_before_image"], 28)
    assert not model(**inputs, output_hidden_states=True).hidden_states[0].requires_grad
    model.enable_input_require_grads()
    out = model(**inputs, output_hidden_states=True)
    assert out.hidden_states[0].requires_grad and out.logits.requires_grad
    model.disable_input_require_grads()
    assert not model(**inputs, output_hidden_states=True).hidden_states[0].requires_grad
    # peft's pattern: frozen base, checkpointing, a trainable adapter after the embeddings still gets gradients
    model.train().gradient_checkpointing_enable({"use_reentrant": True})
    adapter = model.model.language_model.layers[0].self_attn.q_proj.weight
    adapter.requires_grad_(True)
    model(**inputs).logits.sum().backward()
    assert adapter.grad is not None and adapter.grad.abs().sum() > 0


def _five(pair):
    ours, theirs = pair
    lm = MllamaForCausalLM(ours.config.text_config)
    return [("MllamaForConditionalGeneration", ours, theirs),
            ("MllamaForCausalLM", lm, oracle.hf_model(lm, "MllamaForCausalLM")),
            ("MllamaModel", ours.model, theirs.model),
            ("MllamaTextModel", ours.model.language_model, theirs.model.language_model),
            ("MllamaVisionModel", ours.model.vision_model, theirs.model.vision_model)]


def test_hook_attributes_match_transformers_for_the_five_classes(pair):
    classes = {"MllamaForConditionalGeneration": MllamaForConditionalGeneration, "MllamaForCausalLM": MllamaForCausalLM,
               "MllamaModel": MllamaModel, "MllamaTextModel": MllamaTextModel, "MllamaVisionModel": MllamaVisionModel}
    for name, ours, theirs in _five(pair):
        assert type(ours) is classes[name]
        assert ours.main_input_name == theirs.main_input_name, name
        assert classes[name].can_generate() == getattr(transformers, name).can_generate(), name
        assert ours.supports_gradient_checkpointing == theirs.supports_gradient_checkpointing, name
        for method in ("get_input_embeddings", "get_output_embeddings"):
            a, b = getattr(ours, method)(), getattr(theirs, method)()
            assert isinstance(a, type(b)), (name, method)  # the vision patch embedding: a Conv2d subclass
            assert a is None or a.weight.shape == b.weight.shape, (name, method)


@pytest.mark.parametrize("which", ["MllamaModel", "MllamaTextModel"])
def test_resize_token_embeddings_without_lm_head_as_transformers(which):
    ours = randomize(MllamaForConditionalGeneration.from_config(tiny_config()), seed=6)
    theirs = oracle.hf_model(ours)
    pick = (lambda m: m.model) if which == "MllamaModel" else (lambda m: m.model.language_model)
    old = pick(ours).get_input_embeddings().weight.detach().clone()
    a = pick(ours).resize_token_embeddings(IMAGE + 40)
    b = pick(theirs).resize_token_embeddings(IMAGE + 40)
    assert type(a) is type(b) and a.weight.shape == b.weight.shape
    assert pick(ours).get_input_embeddings() is a and torch.equal(a.weight[:IMAGE + 8], old)
    text_config = ours.config.text_config
    assert text_config.vocab_size == theirs.config.text_config.vocab_size
    assert ours.lm_head.out_features == theirs.lm_head.out_features == IMAGE  # no lm_head there to resize
    ids = torch.tensor([[1, IMAGE + 30, 5]])
    with torch.no_grad():
        assert pick(ours)(input_ids=ids).last_hidden_state.shape == (1, 3, 64)


def test_vision_model_has_no_token_embeddings_to_resize(pair):
    ours, theirs = pair
    with pytest.raises(ValueError):
        theirs.model.vision_model.resize_token_embeddings(400)
    with pytest.raises(ValueError, match="no token embeddings"):
        ours.model.vision_model.resize_token_embeddings(400)


# ---------------------------------------------------------------------------------------------------------------
# Construction, loading and saving as transformers' own tests drive them

_CLASSES = {"MllamaForConditionalGeneration": MllamaForConditionalGeneration, "MllamaForCausalLM": MllamaForCausalLM,
            "MllamaModel": MllamaModel, "MllamaTextModel": MllamaTextModel, "MllamaVisionModel": MllamaVisionModel}


def test_base_model_prefix_and_base_model_as_transformers(pair):
    for name, ours, theirs in _five(pair):
        assert type(ours).base_model_prefix == getattr(transformers, name).base_model_prefix, name
        body = dict(ours.named_modules(remove_duplicate=False))
        names = {id(m): n for n, m in theirs.named_modules(remove_duplicate=False)}
        assert [n for n, m in body.items() if m is ours.base_model] == [names[id(theirs.base_model)]], name
    assert pair[0].base_model is pair[0].model and pair[0].model.vocab_size == IMAGE


def test_post_init_initialises_only_what_is_new_and_applies_gradient_checkpointing():
    config = tiny_config()
    model = MllamaForConditionalGeneration(config)  # construction initialises (zero gates, unit norms)
    layer = model.model.language_model.layers[1]
    assert not layer.cross_attn_attn_gate.any() and torch.equal(model.model.language_model.norm.weight,
                                                                torch.ones(64))
    model.resize_token_embeddings(IMAGE + 20, mean_resizing=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.post_init()
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    model.model.multi_modal_projector = torch.nn.Linear(128, 64)
    model.post_init()  # a part set by hand is initialised with the recipe (zero bias)
    assert not model.model.multi_modal_projector.bias.any()
    config.gradient_checkpointing = True
    model = MllamaForConditionalGeneration(config)
    assert model.is_gradient_checkpointing and not hasattr(config, "gradient_checkpointing")


def test_resize_refuses_a_fractional_multiple_like_transformers():
    model = MllamaForCausalLM(tiny_config().text_config)
    with pytest.raises(ValueError, match="multiple of `1.3`, which is not and integer"):
        model.resize_token_embeddings(IMAGE, pad_to_multiple_of=1.3)
    assert model.resize_token_embeddings(IMAGE + 1, pad_to_multiple_of=64).num_embeddings == 384
    assert model.lm_head.out_features == model.config.vocab_size == model.vocab_size == 384


def test_from_pretrained_with_a_state_dict_and_no_folder(pair):
    ours, _ = pair
    loaded = MllamaForConditionalGeneration.from_pretrained(None, config=ours.config, state_dict=ours.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), ours.state_dict().values()))
    assert loaded.state_dict().keys() == ours.state_dict().keys()
    with pytest.raises(ValueError, match="config= and state_dict="):
        MllamaForConditionalGeneration.from_pretrained(None, state_dict=ours.state_dict())


def test_from_pretrained_refuses_a_meta_device_context(pair, tmp_path):
    pair[0].save_pretrained(tmp_path)
    with torch.device("meta"), pytest.raises(RuntimeError, match="meta device context manager"):
        MllamaForConditionalGeneration.from_pretrained(tmp_path)


@pytest.mark.parametrize("name", ["MllamaForConditionalGeneration", "MllamaForCausalLM"])
def test_loading_the_base_model_lists_the_head_as_missing_like_transformers(pair, tmp_path, name):
    """transformers' MllamaForCausalLM finds none of a saved MllamaTextModel's tensors (its base_model_prefix,
    "language_model", names no attribute) and lists them all; mllama loads them and lists only the head."""
    ours = pair[0] if name == "MllamaForConditionalGeneration" else oracle.causal_lm_of(pair[0])
    ours.model.save_pretrained(tmp_path)  # the body without the lm_head
    loaded, info = _CLASSES[name].from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == {"lm_head.weight"}
    if name == "MllamaForConditionalGeneration":
        transformers.logging.set_verbosity_error()
        _, theirs = getattr(transformers, name).from_pretrained(tmp_path, output_loading_info=True)
        assert info["missing_keys"] == theirs["missing_keys"]
    assert torch.equal(loaded.model.get_input_embeddings().weight, ours.model.get_input_embeddings().weight)
    assert loaded.lm_head.weight.device.type == "cpu" and loaded.lm_head.weight.std() > 0


def test_ignore_mismatched_sizes_as_transformers(pair, tmp_path):
    ours, _ = pair
    ours.save_pretrained(tmp_path)
    config = tiny_config()
    config.text_config.vocab_size = IMAGE + 16
    with pytest.raises(CheckpointError, match="ignore_mismatched_sizes"):
        MllamaForConditionalGeneration.from_pretrained(tmp_path, config=config)
    transformers.logging.set_verbosity_error()
    _, theirs = transformers.MllamaForConditionalGeneration.from_pretrained(
        tmp_path, config=oracle.hf_config(config), ignore_mismatched_sizes=True, output_loading_info=True)
    with pytest.warns(UserWarning, match="initialised afresh"):
        loaded, info = MllamaForConditionalGeneration.from_pretrained(
            tmp_path, config=config, ignore_mismatched_sizes=True, output_loading_info=True)
    assert info["mismatched_keys"] == theirs["mismatched_keys"] and len(info["mismatched_keys"]) == 2
    assert info["missing_keys"] == theirs["missing_keys"] == set()
    assert loaded.lm_head.weight.shape[0] == IMAGE + 16
    assert torch.equal(loaded.model.multi_modal_projector.weight, ours.model.multi_modal_projector.weight)


@pytest.mark.parametrize("name", list(_CLASSES))
def test_generation_config_is_saved_only_for_models_that_generate(pair, tmp_path, name):
    model = dict((n, m) for n, m, _ in _five(pair))[name]
    model.save_pretrained(tmp_path)
    assert (tmp_path / "generation_config.json").is_file() == getattr(transformers, name).can_generate()


def test_input_require_grads_reach_the_frozen_vision_tower():
    model = randomize(MllamaForConditionalGeneration.from_config(tiny_config()), seed=4)
    model.requires_grad_(False)
    model.train().gradient_checkpointing_enable({"use_reentrant": True})
    model.enable_input_require_grads()
    adapter = model.model.vision_model.transformer.layers[0].mlp.fc1.weight
    adapter.requires_grad_(True)
    model(**make_inputs(*CASES["text_before_image"], 28)).logits.sum().backward()
    assert adapter.grad is not None and adapter.grad.abs().sum() > 0


@pytest.mark.parametrize("exact_reorder", [True, False])
def test_vision_hidden_states_are_every_layer_output_as_transformers_computes_them(pair, exact_reorder):
    """transformers' vision model answers output_hidden_states with (last_hidden_state,); mllama gives the
    embeddings and every local and global layer's output, here checked against transformers' layers (hooked)."""
    ours, theirs = pair
    inputs = make_inputs(*CASES["padded_batch"], 28)
    vision = theirs.model.vision_model
    recorded = []
    layers = list(vision.transformer.layers) + list(vision.global_transformer.layers)
    hooks = [layer.register_forward_hook(lambda m, i, o: recorded.append(o[0] if isinstance(o, tuple) else o))
             for layer in layers]
    args = (inputs["pixel_values"], inputs["aspect_ratio_ids"], inputs["aspect_ratio_mask"])
    with torch.no_grad():
        vision(*args)
        out = ours.model.vision_model(*args, output_hidden_states=True, exact_reorder=exact_reorder)
    for hook in hooks:
        hook.remove()
    b, n, t, patches, dim = out.hidden_states[0].shape
    assert len(out.hidden_states) == 1 + len(layers)
    real = inputs["aspect_ratio_mask"].bool()  # padding tiles' values differ between the two forms
    for mine, reference in zip(out.hidden_states[1:], recorded):
        reference = reference.reshape(b, n, t, -1, dim)[:, :, :, :patches]
        assert _max_diff(mine[real], reference[real]) <= TOL * reference.abs().max().item()


def test_past_key_values_is_a_key_of_the_outputs_as_in_transformers(pair):
    ours, theirs = pair
    inputs = make_inputs(*CASES["text_before_image"], 28)
    with torch.no_grad():
        for use_cache in (True, False):
            a, b = ours(**inputs, use_cache=use_cache), theirs(**inputs, use_cache=use_cache)
            assert ("past_key_values" in a) == ("past_key_values" in b) == use_cache
            assert (a["past_key_values"] is a.cache) if use_cache else a.past_key_values is None
