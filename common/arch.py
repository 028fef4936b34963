"""The published Qwen2.5-VL-Instruct architectures, in one place, so full-shape code needs no download.

Numbers copied from each model's `config.json` on the hub (Qwen/Qwen2.5-VL-{3B,7B,32B}-Instruct, text part =
`text_config`/top-level LM fields, vision part = `vision_config`). Used by the memory simulation
(common/simulate.py, `--simulate_world`), bench/gpu_mfu.py and tests/test_gpu.py.

    cfg = arch.config("7b")                 # a transformers Qwen2_5_VLConfig, nothing read from a hub
    folder = arch.write_folder("7b", dir)   # dir/config.json: build_meta(folder) builds the model on meta
"""

import os

# text: hidden, intermediate, layers, heads, kv heads, vocab, tied embeddings; vision: intermediate, out_hidden
_TEXT = {
    "3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
               num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "32b": dict(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
                num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False),
}
_VISION_INTERMEDIATE = {"3b": 3420, "7b": 3420, "32b": 3456}
SIZES = tuple(_TEXT)


def config(size: str, **text_overrides):
    """Qwen2_5_VLConfig of the published `size` (3b | 7b | 32b); `text_overrides` change text fields (tests shrink
    num_hidden_layers). Raises KeyError for other sizes. Shared fields (all three): rms_norm_eps 1e-6, rope_theta
    1e6, mrope_section [16, 24, 24], max_position_embeddings 128000; vision: depth 32, hidden 1280, 16 heads, patch
    14, spatial merge 2, temporal patch 2, window 112, full-attention blocks 7/15/23/31."""
    from transformers import Qwen2_5_VLConfig

    size = size.lower()
    text = dict(_TEXT[size], max_position_embeddings=128000, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
    text.update(text_overrides)
    vision = dict(depth=32, hidden_size=1280, intermediate_size=_VISION_INTERMEDIATE[size], num_heads=16,
                  out_hidden_size=text["hidden_size"], patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                  window_size=112, fullatt_block_indexes=[7, 15, 23, 31], in_channels=3)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=151655, video_token_id=151656,
                            vision_start_token_id=151652, vision_end_token_id=151653,
                            tie_word_embeddings=text["tie_word_embeddings"])


def write_folder(size: str, folder: str, **text_overrides) -> str:
    """Write `folder`/config.json for `size` (no weights, no tokenizer) and return the folder."""
    os.makedirs(folder, exist_ok=True)
    config(size, **text_overrides).save_pretrained(folder)
    return folder
