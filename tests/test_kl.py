"""KL(policy || reference): the estimator against analytic KLs, and the sampled estimate of a
tiny in-process Llama against the exact KL computed by enumerating every response."""

import copy
import math
from contextlib import contextmanager

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from online.kl import KLEstimate, estimate_kl, kl_from_logps, response_logps

WORDS = ["<pad>", "<eos>", "<unk>"] + "a b c d e f g h the cat dog sat ran on mat".split()
EOS = 1


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
        eos_token_id=EOS, pad_token_id=0, bos_token_id=None, attn_implementation="eager",
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.4)  # default init gives near-uniform next tokens
    return model


def perturbed(model: LlamaForCausalLM, seed: int = 1, scale: float = 0.3) -> LlamaForCausalLM:
    ref = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        ref.lm_head.weight.add_(scale * torch.randn(ref.lm_head.weight.shape, generator=gen))
    return ref


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and lose a lot on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------- pure estimator


def test_single_token_estimate_matches_analytic_categorical_kl():
    """y ~ p over 5 symbols; the exact KL(p || q) = sum_y p(y) log p(y)/q(y)."""
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05], dtype=torch.float64)
    q = torch.full((5,), 0.2, dtype=torch.float64)
    exact = (p * (p / q).log()).sum().item()  # ≈ 0.2749 nats
    y = torch.multinomial(p, 20_000, replacement=True, generator=torch.Generator().manual_seed(0))
    est = kl_from_logps(p.log()[y], q.log()[y], torch.ones_like(y))
    assert est.n == 20_000 and est.mean_length == 1.0
    assert 0 < est.stderr < 0.01
    assert abs(est.sequence - exact) < 4 * est.stderr
    assert est.per_token == pytest.approx(est.sequence)  # every response is one token


def test_variable_length_sequences_give_sequence_and_per_token_kl():
    """Tokens i.i.d. from p, lengths 1..6: sequence KL = E[L]·KL(p||q), per-token KL = KL(p||q)."""
    gen = torch.Generator().manual_seed(1)
    p = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    q = torch.tensor([0.3, 0.3, 0.4], dtype=torch.float64)
    token_kl = (p * (p / q).log()).sum().item()
    lengths = torch.randint(1, 7, (8_000,), generator=gen)
    pol, ref = [], []
    for n in lengths.tolist():
        y = torch.multinomial(p, n, replacement=True, generator=gen)
        pol.append(p.log()[y].sum().item())
        ref.append(q.log()[y].sum().item())
    est = kl_from_logps(pol, ref, lengths)
    assert abs(est.sequence - 3.5 * token_kl) < 4 * est.stderr
    assert abs(est.per_token - token_kl) < 4 * est.per_token_stderr
    assert est.per_token_stderr < est.stderr


def test_stderr_by_hand_and_cluster_robust_groups():
    est = kl_from_logps([1.0, 2.0, 3.0, 4.0], [0.0] * 4, [1, 1, 2, 2])
    assert est.sequence == 2.5 and est.per_token == pytest.approx(10 / 6)
    assert est.stderr == pytest.approx(math.sqrt(5 / 3) / 2)  # sample sd / sqrt(n)
    # Stratified by prompt: only the spread within a prompt is sampling noise.
    grouped = kl_from_logps([1.0, 3.0, 10.0, 14.0], [0.0] * 4, [1] * 4, groups=[0, 0, 1, 1])
    assert grouped.sequence == 7.0
    assert grouped.stderr == pytest.approx(math.sqrt((2 * 2 + 2 * 8) / 16))  # sum n_g s_g^2 / N^2
    constant = kl_from_logps([1.0, 1.0, 3.0, 3.0], [0.0] * 4, [1] * 4, groups=[5, 5, 9, 9])
    assert constant.stderr == 0.0
    # One sample per prompt: the prompts count as a sample of prompts (one stratum, s/sqrt(n)).
    one_each = kl_from_logps([1.0, 3.0], [0.0] * 2, [1, 1], groups=[0, 1])
    assert one_each.stderr == pytest.approx(math.sqrt(2) / math.sqrt(2))
    # A prompt with two samples beside single ones: the singles carry no within-prompt spread.
    mixed = kl_from_logps([1.0, 3.0, 9.0], [0.0] * 3, [1] * 3, groups=[0, 0, 1])
    assert mixed.stderr == pytest.approx(math.sqrt(2 * 2) / 3)
    single = kl_from_logps([0.3], [0.1], [2])
    assert single.sequence == pytest.approx(0.2) and math.isnan(single.stderr)
    assert set(est.metrics()) >= {"kl/policy_ref", "kl/policy_ref_per_token", "kl/stderr"}


def test_estimator_input_checks():
    with pytest.raises(ValueError, match="matching sizes"):
        kl_from_logps([1.0, 2.0], [1.0], [1, 1])
    with pytest.raises(ValueError, match="matching sizes"):
        kl_from_logps([], [], [])
    with pytest.raises(ValueError, match=">= 1 token"):
        kl_from_logps([1.0], [1.0], [0])
    with pytest.raises(ValueError, match="groups"):
        kl_from_logps([1.0, 2.0], [1.0, 1.0], [1, 1], groups=[0])


# -------------------------------------------------------------------- models, end to end


def exact_kl_two_tokens(policy, reference, prompt_ids: list[int]) -> float:
    """Exact KL over every response of at most 2 tokens (stopping early at EOS)."""

    @torch.no_grad()
    def next_logps(model, rows):  # (R, V) log-probs of the token after each row
        return model(input_ids=torch.tensor(rows)).logits[:, -1].double().log_softmax(-1)

    pi1, rho1 = next_logps(policy, [prompt_ids])[0], next_logps(reference, [prompt_ids])[0]  # (V,)
    rows = [prompt_ids + [y] for y in range(len(WORDS))]
    pi2, rho2 = next_logps(policy, rows), next_logps(reference, rows)  # (V, V)
    second = (pi2.exp() * (pi2 - rho2)).sum(-1)  # (V,) KL of the second token given y1
    second[EOS] = 0.0  # the response stopped at y1 = EOS
    return (pi1.exp() * (pi1 - rho1 + second)).sum().item()


def test_estimate_kl_matches_exact_enumeration():
    tok, policy = tiny_tokenizer(), tiny_model()
    reference = perturbed(policy)
    prompts = [("the cat", "animals"), "a b c"]
    texts = ["the cat", "a b c"]
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    exact = [exact_kl_two_tokens(policy, reference, row) for row in ids]
    est = estimate_kl(
        policy, reference, tok, prompts, n_samples=1000, max_new_tokens=2, seed=0, batch_size=1000
    )
    assert est.n == 2000 and 1.0 <= est.mean_length <= 2.0
    target = sum(exact) / 2  # equal samples per prompt
    assert target > 0.05  # the check is not vacuous
    assert abs(est.sequence - target) < 4 * est.stderr
    assert est.stderr < 0.2 * target


def test_identical_models_have_zero_kl_and_response_logps_is_a_real_logprob():
    tok, policy = tiny_tokenizer(), tiny_model()
    est = estimate_kl(policy, policy, tok, ["the cat", "dog"], n_samples=4, max_new_tokens=5, seed=0)
    assert est.sequence == 0.0 and est.per_token == 0.0 and est.stderr == 0.0
    # Summed log-probs of all one-token responses to a prompt sum to probability 1.
    logps = response_logps(policy, [[11, 12]] * len(WORDS), [[y] for y in range(len(WORDS))], pad_id=0)
    assert logps.exp().sum().item() == pytest.approx(1.0, abs=1e-5)
    # Right padding does not change a row's score.
    mixed = response_logps(policy, [[11, 12], [3]], [[4, 5, EOS], [6]], pad_id=0)
    alone = torch.cat(
        [response_logps(policy, [[11, 12]], [[4, 5, EOS]], 0), response_logps(policy, [[3]], [[6]], 0)]
    )
    assert torch.allclose(mixed, alone, atol=1e-5)


def test_context_manager_reference_equals_a_separate_reference_model():
    """A LoRA policy's reference is the same weights with the adapter off: emulate with a swap."""
    tok, policy = tiny_tokenizer(), tiny_model()
    reference = perturbed(policy)
    policy_head = policy.lm_head.weight.detach().clone()

    @contextmanager
    def as_reference():
        with torch.no_grad():
            policy.lm_head.weight.copy_(reference.lm_head.weight)
        try:
            yield
        finally:
            with torch.no_grad():
                policy.lm_head.weight.copy_(policy_head)

    policy.train()
    prompts = ["the cat", "a b"]
    separate = estimate_kl(policy, reference, tok, prompts, n_samples=8, max_new_tokens=4, seed=3)
    swapped = estimate_kl(policy, as_reference, tok, prompts, n_samples=8, max_new_tokens=4, seed=3)
    assert isinstance(swapped, KLEstimate)
    assert swapped.sequence == pytest.approx(separate.sequence, abs=1e-5)
    assert swapped.per_token == pytest.approx(separate.per_token, abs=1e-6)
    assert policy.training and torch.equal(policy.lm_head.weight, policy_head)  # state restored
