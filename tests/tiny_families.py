"""Tiny random transformers configs, one or more per HF family: shared by the parity and PEFT-format suites (a
helper module, not a test module)."""

import torch
import transformers as tf

V = 160
TINY = {
    "llama-gqa": lambda: tf.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64),
    # Llama's attention_bias + mlp_bias (a bias on every attention and MLP linear): Config.bias
    "llama-bias": lambda: tf.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                         attention_bias=True, mlp_bias=True),
    "llama3-scaled-tied": lambda: tf.LlamaConfig(
        vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=True, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16}),
    "smollm2-tied": lambda: tf.LlamaConfig(vocab_size=V, hidden_size=48, intermediate_size=128, num_hidden_layers=3,
                                           num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=64,
                                           tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5),
    "mistral": lambda: tf.MistralConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        sliding_window=4096),
    "mistral-sliding-window": lambda: tf.MistralConfig(vocab_size=V, hidden_size=64, intermediate_size=96,
                                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                       max_position_embeddings=64, sliding_window=8),
    "qwen2-qkv-bias": lambda: tf.Qwen2Config(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                             tie_word_embeddings=True),
    "falcon-7b-mqa": lambda: tf.FalconConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                             multi_query=True, parallel_attn=True, new_decoder_architecture=False,
                                             bias=False, alibi=False, max_position_embeddings=64),
    "falcon-40b-gqa": lambda: tf.FalconConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                                              num_kv_heads=2, new_decoder_architecture=True, parallel_attn=True,
                                              bias=False, alibi=False, max_position_embeddings=64),
    "pythia-partial-rotary": lambda: tf.GPTNeoXConfig(vocab_size=V, hidden_size=64, intermediate_size=128,
                                                      num_hidden_layers=2, num_attention_heads=4, rotary_pct=0.25,
                                                      use_parallel_residual=True, max_position_embeddings=64),
    "stablelm-alpha-sequential": lambda: tf.GPTNeoXConfig(vocab_size=V, hidden_size=64, intermediate_size=128,
                                                          num_hidden_layers=2, num_attention_heads=4, rotary_pct=0.25,
                                                          use_parallel_residual=False, max_position_embeddings=64),
    "gpt2": lambda: tf.GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64),
    "phi-2": lambda: tf.PhiConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, partial_rotary_factor=0.5, max_position_embeddings=64),
}


def random_hf(name: str, tmp_path):
    """A transformers model of the tiny config `name` with every tensor perturbed (norms and biases too, so a wrong
    mapping of any tensor shows in the logits), saved to tmp_path/hf: (model, folder)."""
    torch.manual_seed(0)
    cfg = TINY[name]()
    cfg._attn_implementation = "sdpa"
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(tmp_path / "hf")
    return model, tmp_path / "hf"


def make_hf(name: str, tmp_path):
    """The folder of `random_hf`."""
    return random_hf(name, tmp_path)[1]


def load_hf(folder):
    return tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
