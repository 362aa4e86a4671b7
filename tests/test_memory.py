"""The memory model (``hf_lwf.memory``) against the quantities it adds up, computed by hand for a Llama shape."""

from types import SimpleNamespace

from hf_lwf.memory import LOGIT_BYTES, activation_bytes_per_token, pass_bytes, predict_added_bytes


LLAMA_1B = SimpleNamespace(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                           num_key_value_heads=8, vocab_size=128256)


def test_activations_count_the_saved_tensors_of_every_layer():
    d, f, kv = 2048, 8192, 8 * 64
    per_layer = 2 * (9 * d + 2 * kv + 4 * f) + 2 * 4 * d  # bf16 tensors plus two fp32 RMSNorm inputs
    assert activation_bytes_per_token(LLAMA_1B) == 16 * per_layer
    tokens = 8 * 512
    assert pass_bytes(LLAMA_1B, tokens) == tokens * 16 * per_layer + LOGIT_BYTES * tokens * 128256


def test_lwf_adds_its_state_when_scoring_stays_below_a_learning_step():
    n = 1_235_814_400
    prediction = predict_added_bytes(LLAMA_1B, trainable=n, learning_tokens=8 * 512, score_tokens=113)
    assert prediction["state"] == n * (4 + 2)  # fp32 F and theta_ref in the weights' bf16
    assert prediction["point_transient"] < prediction["learning_transient"]
    assert prediction["added"] == prediction["state"]


def test_state_on_the_host_counts_only_where_a_scoring_round_stages_it():
    n = 8_000_000_000
    big = SimpleNamespace(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=8, vocab_size=128256)
    host = predict_added_bytes(big, trainable=n, learning_tokens=8 * 512, score_tokens=113, state_on_device=False)
    assert host["state"] == 0
    assert host["added"] == max(0, host["point_transient"] - host["learning_transient"])
    assert host["point_transient"] >= n * 6  # F and theta_ref copied to the device for the round
