"""Real models wrapped the way their users wrap nn.DataParallel, against the
unwrapped module on the full batch (float64, 3 CPU replicas)."""

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

import dpfast

torchvision = pytest.importorskip("torchvision")  # in requirements.txt

CPU3 = ["cpu"] * 3


def pair(factory, seed=0):
    torch.manual_seed(seed)
    reference = factory().double()
    return reference, dpfast.DataParallel(copy.deepcopy(reference), device_ids=CPU3)


def assert_train_step_matches(reference, wrapped, x, out=lambda o: o, rtol=1e-9, atol=1e-12):
    out_ref, out_dp = out(reference(x)), out(wrapped(x))
    torch.testing.assert_close(out_dp, out_ref, rtol=rtol, atol=atol)
    out_ref.pow(2).mean().backward()
    out_dp.pow(2).mean().backward()
    for (name, p), q in zip(reference.named_parameters(), wrapped.module.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "squeezenet1_1"])
def test_torchvision_cnns_in_eval_match_exactly(name):
    reference, wrapped = pair(lambda: getattr(torchvision.models, name)(num_classes=10))
    reference.eval()
    wrapped.eval()
    x = torch.randn(5, 3, 48, 48, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), reference(x), rtol=1e-10, atol=1e-12)


def test_googlenet_training_with_aux_outputs_and_batchnorm_per_chunk():
    """Training-mode GoogLeNet returns a namedtuple with two auxiliary heads; its BatchNorm layers
    normalize each replica's chunk with that chunk's statistics, as under nn.DataParallel: the
    reference is the bare model run on the same chunks one after the other."""
    reference, wrapped = pair(lambda: torchvision.models.googlenet(
        num_classes=5, aux_logits=True, init_weights=True, dropout=0.0, dropout_aux=0.0))
    reference.train()
    wrapped.train()
    x = torch.randn(6, 3, 64, 64, dtype=torch.float64)
    out = wrapped(x)
    assert type(out).__name__ == "GoogLeNetOutputs" and all(t.shape == (6, 5) for t in out)
    chunks = [reference(c) for c in x.chunk(3)]
    expected = [torch.cat(parts) for parts in zip(*chunks)]
    for got, want in zip(out, expected):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
    sum(t.pow(2).mean() for t in out).backward()
    sum(t.pow(2).mean() for t in expected).backward()
    for (name, p), q in zip(reference.named_parameters(), wrapped.module.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-8, atol=1e-10, msg=name)


def test_torchvision_vision_transformer_trains_like_the_full_batch():
    reference, wrapped = pair(lambda: torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=5))
    assert_train_step_matches(reference, wrapped, torch.randn(6, 3, 32, 32, dtype=torch.float64))


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x, padding_mask=None):
        return self.head(self.encoder(x, src_key_padding_mask=padding_mask))


def test_transformer_encoder_with_padding_mask_in_train_and_eval():
    reference, wrapped = pair(Encoder)
    x = torch.randn(6, 5, 16, dtype=torch.float64)
    mask = torch.zeros(6, 5, dtype=torch.bool)
    mask[:, -1] = True
    torch.testing.assert_close(wrapped(x, padding_mask=mask), reference(x, padding_mask=mask))
    assert_train_step_matches(reference, wrapped, x)
    reference.eval()
    wrapped.eval()
    with torch.no_grad():  # the fused fast path of nn.TransformerEncoderLayer
        torch.testing.assert_close(wrapped(x), reference(x))


@pytest.mark.parametrize("factory", [
    lambda: nn.Sequential(parametrizations.weight_norm(nn.Linear(8, 8)), nn.Tanh(), nn.Linear(8, 2)),
    lambda: nn.Sequential(parametrizations.spectral_norm(nn.Linear(8, 8)), nn.Linear(8, 2)),
    lambda: nn.Sequential(nn.utils.spectral_norm(nn.Linear(8, 8)), nn.Linear(8, 2)),
], ids=["weight_norm", "spectral_norm", "spectral_norm_hooks"])
def test_parametrized_and_hooked_weights(factory):
    reference, wrapped = pair(factory)
    assert_train_step_matches(reference, wrapped, torch.randn(6, 8, dtype=torch.float64))


def test_old_style_weight_norm_trajectory():
    def make():  # cannot be deep-copied (a torch limitation): build twice from one seed
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return nn.Sequential(nn.utils.weight_norm(nn.Linear(8, 8)), nn.Tanh(), nn.Linear(8, 2)).double()

    reference, wrapped = make(), dpfast.DataParallel(make(), device_ids=CPU3)
    x = torch.randn(6, 8, dtype=torch.float64)
    for _ in range(3):
        for model in (reference, wrapped):
            model.zero_grad()
            model(x).pow(2).mean().backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.1 * p.grad
    for p, q in zip(reference.parameters(), wrapped.module.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-10, atol=1e-12)


def test_gru_bidirectional_two_layers():
    reference, wrapped = pair(lambda: nn.GRU(4, 8, num_layers=2, batch_first=True, bidirectional=True))
    assert_train_step_matches(reference, wrapped, torch.randn(6, 5, 4, dtype=torch.float64), out=lambda o: o[0])


def test_wgan_gradient_penalty_double_backward():
    """torch.autograd.grad with respect to the inputs, create_graph=True, then backward through it."""
    reference, wrapped = pair(lambda: nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1)))
    x = torch.randn(6, 8, dtype=torch.float64)
    for model in (reference, wrapped):
        inputs = x.clone().requires_grad_(True)
        critic = model(inputs)
        grad, = torch.autograd.grad(critic.sum(), inputs, create_graph=True)
        (critic.mean() + 10 * ((grad.norm(2, dim=1) - 1) ** 2).mean()).backward()
    for p, q in zip(reference.parameters(), wrapped.module.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["bert", "gpt2", "t5"])
def test_hugging_face_models_with_the_loss_inside_forward(name):
    """The Hugging Face pattern: pass labels, get a ModelOutput with .loss; with nn.DataParallel
    users write outputs.loss.mean(). Models are built from small configs (nothing downloaded)."""
    transformers = pytest.importorskip("transformers")  # in requirements.txt
    batch, length = 7, 12
    ids = torch.randint(0, 100, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[:, -3:] = 0
    if name == "bert":
        config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64, num_labels=3)
        factory, labels = (lambda: transformers.BertForSequenceClassification(config)), torch.randint(0, 3, (batch,))
    elif name == "gpt2":
        config = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                         bos_token_id=0, eos_token_id=0)
        factory, labels = (lambda: transformers.GPT2LMHeadModel(config)), ids
    else:
        config = transformers.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=2,
                                       decoder_start_token_id=0, pad_token_id=0)
        factory, labels = (lambda: transformers.T5ForConditionalGeneration(config)), ids[:, :5].contiguous()
    reference, vector = pair(factory)
    reference.eval()  # dropout off: exact comparison
    vector.eval()
    mean = dpfast.DataParallel(copy.deepcopy(reference), device_ids=CPU3, scalar_outputs="mean")
    inputs = dict(input_ids=ids, attention_mask=mask, labels=labels)
    if name == "gpt2":
        # GPT-2's own padded-mask path rounds differently for different batch sizes (float32-level,
        # even in float64): compare without a mask; per chunk, dpfast matches it exactly either way.
        del inputs["attention_mask"]
    expected = reference(**inputs)
    outputs = vector(**inputs)
    assert type(outputs) is type(expected) and outputs.loss.shape == (3,)  # one loss per replica, no warning
    torch.testing.assert_close(outputs.logits, expected.logits)
    loss = mean(**inputs).loss  # the chunk-size weighted mean: the full batch's loss
    torch.testing.assert_close(loss, expected.loss)
    loss.backward()
    expected.loss.backward()
    # GPT-2's causal-LM loss upcasts logits with .float(): float32 even in a float64 model, so its
    # full-batch mean and the weighted mean of chunk means round differently (~1e-8).
    rtol, atol = (1e-6, 1e-8) if name == "gpt2" else (1e-10, 1e-12)
    for (key, p), q in zip(reference.named_parameters(), mean.module.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=rtol, atol=atol, msg=key)


def test_hugging_face_cache_is_gathered_into_one_cache():
    """GPT-2 in eval returns its key/value cache (a DynamicCache, which Hugging Face builds to be
    gathered by nn.DataParallel): one cache of the whole batch, usable to go on generating."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)
    reference, wrapped = pair(lambda: transformers.GPT2LMHeadModel(config))
    reference.eval()
    wrapped.eval()
    ids = torch.randint(0, 100, (7, 12))
    with torch.no_grad():
        expected = reference(input_ids=ids, use_cache=True)
        outputs = wrapped(input_ids=ids, use_cache=True)
        key = "cache" if "cache" in expected else "past_key_values"  # renamed "cache" in transformers 5.2x
        cache = outputs[key]
        assert type(cache) is type(expected[key])
        step = torch.randint(0, 100, (7, 1))
        logits = reference(input_ids=step, **{key: cache}).logits
        # The next token's logits from the gathered cache are those of the whole sequence run anew.
        whole = reference(input_ids=torch.cat([ids, step], 1)).logits[:, -1:]
        torch.testing.assert_close(logits, whole)


def test_hugging_face_hidden_states_and_attentions_match_the_model():
    """transformers installs its output-capturing hooks in the first forward that asks for
    output_hidden_states/output_attentions; each replica's install stays with that replica (NOTE
    [Replica hooks]), so every call returns one hidden state per layer, and the module itself is
    left with one set of hooks."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, attn_implementation="eager")  # eager: attentions come out
    reference, wrapped = pair(lambda: transformers.BertModel(config))
    reference.eval()
    wrapped.eval()
    ids = torch.randint(1, 100, (6, 10))
    expected = reference(input_ids=ids, output_hidden_states=True, output_attentions=True)
    for _ in range(3):
        out = wrapped(input_ids=ids, output_hidden_states=True, output_attentions=True)
        assert len(out.hidden_states) == len(expected.hidden_states) == 3
        assert len(out.attentions) == len(expected.attentions) == 2
        for got, want in zip(out.hidden_states + out.attentions, expected.hidden_states + expected.attentions):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    alone = wrapped.module(input_ids=ids, output_hidden_states=True)
    assert len(alone.hidden_states) == 3


def test_quantization_aware_training_first_steps_match_per_chunk_copies():
    """prepare_qat's FakeQuantize modules grow their scale, zero_point and observers' min/max
    buffers from 0 or 1 element to one per channel in the first training forward (resize_): each
    replica must run as a copy of the model on its chunk, as under nn.DataParallel, from that first
    step on (float32: fake quantization has no float64 kernels)."""
    quantization = torch.ao.quantization

    def build():
        torch.manual_seed(0)
        model = nn.Sequential(quantization.QuantStub(), nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3),
                              quantization.DeQuantStub())
        model.qconfig = quantization.get_default_qat_qconfig("fbgemm")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return quantization.prepare_qat(model.train())

    reference = build()
    wrapped = dpfast.DataParallel(copy.deepcopy(reference), device_ids=CPU3)
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        expected = torch.cat([copy.deepcopy(reference)(chunk) for chunk in x.chunk(3)])
        torch.testing.assert_close(wrapped(x), expected, rtol=1e-6, atol=1e-6)
        reference(x[:2])  # replica 0's chunk, run by the module itself: the observers' state
        for (name, want), got in zip(reference.named_buffers(), wrapped.module.buffers()):
            torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)


class _LinearThenNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x):
        return self.bn(self.a(x))


@pytest.mark.parametrize("how", ["torch.compile(module)", "module.compile()", "submodule.compile()"])
def test_compiled_modules_run_each_replica_on_its_own_weights(how):
    """NOTE [Compiled modules]: torch.compile's OptimizedModule and module.compile() keep a compiled
    forward bound to the root module in its __dict__; copied as they were, every replica ran the
    root's weights and BatchNorm buffers (from every thread at once: the running statistics took
    every chunk's update). Each replica now runs the same compilation around its own module."""
    torch.manual_seed(0)
    module = _LinearThenNorm().double()
    reference = copy.deepcopy(module)
    ran = []
    module.a.register_forward_hook(lambda m, args, out: ran.append(m.weight))
    if how == "torch.compile(module)":
        compiled = torch.compile(module, backend="eager")
    elif how == "module.compile()":
        module.compile(backend="eager")
        compiled = module
    else:
        module.a.compile(backend="eager")
        compiled = module
    wrapped = dpfast.DataParallel(compiled, device_ids=CPU3)
    x = torch.randn(9, 4, dtype=torch.float64)
    for _ in range(2):
        ran.clear()
        out = wrapped(x)
        chunks = x.chunk(3)
        copies = [copy.deepcopy(reference) for _ in range(2)]
        want = torch.cat([reference(chunks[0])] + [c(chunk) for c, chunk in zip(copies, chunks[1:])])
        torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
        # Each weight once at most (the root's ran three times before). Not always three calls:
        # dynamo, compiling from several threads at once, may leave a traced hook's side effect out.
        assert len({id(w) for w in ran}) == len(ran) and sum(w is module.a.weight for w in ran) <= 1
        torch.testing.assert_close(module.bn.running_mean, reference.bn.running_mean, rtol=1e-12, atol=1e-12)
        out.pow(2).sum().backward()
        want.pow(2).sum().backward()
        for (name, p), q in zip(reference.named_parameters(), module.parameters()):
            expected = p.grad + sum(c.get_parameter(name).grad for c in copies)
            torch.testing.assert_close(q.grad, expected, rtol=1e-10, atol=1e-12, msg=name)
            p.grad = None
            q.grad = None
    j = 1 if how == "submodule.compile()" else 0
    root, replica = (mods[j] for mods in wrapped._runtime.replicas.replica_modules[:2])
    key = "forward" if how == "torch.compile(module)" else "_compiled_call_impl"
    compiled_forward = replica.__dict__[key]
    assert getattr(compiled_forward, "_torchdynamo_orig_callable", None) is not None  # compiled, not eager
    assert compiled_forward is not root.__dict__[key]


def test_hugging_face_sliding_window_cache_is_gathered_into_one_cache():
    """A sliding-window model's DynamicCache (Mistral) yields each layer's window size, a 0-dim
    tensor, with its keys and values: gathered as a vector of one per replica, the cache could not
    be built from it, and the replicas' caches came back side by side in a list. The window size,
    alike in every replica, is kept as it is."""
    transformers = pytest.importorskip("transformers")
    config = transformers.MistralConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        sliding_window=4, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    reference, wrapped = pair(lambda: transformers.MistralForCausalLM(config))  # 3 replicas: 2, 2 and 1 rows
    reference.eval()
    wrapped.eval()
    ids = torch.randint(1, 100, (5, 6))
    with torch.no_grad():
        expected = reference(input_ids=ids, use_cache=True)
        outputs = wrapped(input_ids=ids, use_cache=True)
    key = "cache" if "cache" in expected else "past_key_values"
    cache, expected_cache = outputs[key], expected[key]
    assert type(cache) is type(expected_cache)
    for got, want in zip(cache.layers, expected_cache.layers):
        torch.testing.assert_close(got.keys, want.keys)
        torch.testing.assert_close(got.values, want.values)
    torch.testing.assert_close(outputs.logits, expected.logits)
