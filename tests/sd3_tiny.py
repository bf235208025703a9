"""
A tiny, random Stable Diffusion 3 pipeline built entirely offline.

Every component of StableDiffusion3Pipeline is built from a config with tiny sizes and seeded random
weights, and the tokenizers are built in memory (no hub download), so tests can exercise the real
diffusers loading and sampling code in a few seconds on a CPU:

    from tests.sd3_tiny import build_tiny_sd3, TINY_SD3_IMAGE_SIZE
    build_tiny_sd3(tmp_path)
    pipe = StableDiffusion3Pipeline.from_pretrained(tmp_path)
    pipe(["a cat"], height=TINY_SD3_IMAGE_SIZE, width=TINY_SD3_IMAGE_SIZE, num_inference_steps=2)

The layout follows diffusers' own SD3 fast tests (tests/pipelines/stable_diffusion_3 in
huggingface/diffusers), but keeps SD3's structural choices where they are cheap: 16 latent channels,
a downsampling VAE (2x here, 8x in SD3) with SD3's scaling/shift factors, patch size 2, and the
shifted flow-matching scheduler (shift 3.0). Constraints SD3 imposes between components:
  - T5 d_model == transformer.joint_attention_dim (T5 states are the context tokens);
  - encode_prompt concatenates the two CLIP hidden states on the feature axis and zero-pads them to
    the T5 width, so CLIP hidden + CLIP-2 hidden <= joint_attention_dim (768 + 1280 <= 4096 in SD3);
  - transformer.pooled_projection_dim == 2 * CLIP projection_dim (the two pooled outputs concatenated).
"""

import os

import torch

TINY_SD3_IMAGE_SIZE = 32  # pixels; the VAE downsamples 2x -> 16x16 latents -> 8x8 tokens with patch 2
TINY_CLIP_HIDDEN = 16     # each CLIP text encoder's width (two of them, concatenated -> 32)
TINY_CLIP_PROJ = 16       # CLIP projection dim; pooled = concat of two -> 32
TINY_JOINT_DIM = 32       # T5 d_model == transformer joint_attention_dim
TINY_LATENT_CHANNELS = 16  # as SD3's VAE
SD3_VAE_SCALING = 1.5305   # SD3's vae.config.scaling_factor
SD3_VAE_SHIFT = 0.0609     # SD3's vae.config.shift_factor

# a character-level vocabulary: enough to tokenise any lowercase English prompt without merges
_CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'\"-:;()")

# -----------------------------------------------------------------------------
# tokenizers, built in memory (no SentencePiece model, no hub)


def tiny_clip_tokenizer(model_max_length=77):
    """A character-level CLIP BPE tokenizer (no merges). model_max_length must be set: an in-memory
    tokenizer otherwise reports a huge one and SD3's encode_prompt pads to it."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in _CHARS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)  # CLIP's BPE marks the last character of a word
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def tiny_t5_tokenizer(model_max_length=256):
    """A character-level Unigram T5 tokenizer (ids: <pad>=0, </s>=1, <unk>=2 as T5's)."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(c, -2.0) for c in _CHARS] + [("\u2581" + c, -1.5) for c in _CHARS]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


# -----------------------------------------------------------------------------
# the pipeline


def build_tiny_sd3(path, seed=0):
    """Build a tiny random SD3 pipeline and save_pretrained it to `path`; returns the path."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    tokenizer, tokenizer_2, tokenizer_3 = tiny_clip_tokenizer(), tiny_clip_tokenizer(), tiny_t5_tokenizer()

    # the ids below must agree with the tokenizers: CLIP pools at the first eos (id 1)
    clip_config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TINY_CLIP_HIDDEN, intermediate_size=37,
        num_hidden_layers=2, num_attention_heads=2, projection_dim=TINY_CLIP_PROJ,
        max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        hidden_act="gelu", layer_norm_eps=1e-5,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModelWithProjection(clip_config)
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(clip_config)

    t5_config = T5Config(
        vocab_size=len(tokenizer_3), d_model=TINY_JOINT_DIM, d_kv=8, d_ff=37, num_layers=2,
        num_heads=4, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0,
    )
    torch.manual_seed(seed + 2)
    text_encoder_3 = T5EncoderModel(t5_config)

    latent_size = TINY_SD3_IMAGE_SIZE // 2
    torch.manual_seed(seed + 3)
    transformer = SD3Transformer2DModel(
        sample_size=latent_size, patch_size=2, in_channels=TINY_LATENT_CHANNELS,
        out_channels=TINY_LATENT_CHANNELS, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=TINY_JOINT_DIM, caption_projection_dim=32,
        pooled_projection_dim=2 * TINY_CLIP_PROJ, pos_embed_max_size=32,
    )

    torch.manual_seed(seed + 4)
    vae = AutoencoderKL(
        sample_size=TINY_SD3_IMAGE_SIZE, in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), layers_per_block=1, latent_channels=TINY_LATENT_CHANNELS,
        norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=SD3_VAE_SCALING, shift_factor=SD3_VAE_SHIFT,
    )

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)

    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
    )
    pipe.save_pretrained(os.fspath(path))
    return path


if __name__ == "__main__":
    import sys

    out = sys.argv[1] if len(sys.argv) > 1 else "tiny-sd3"
    build_tiny_sd3(out)
    print(f"tiny SD3 pipeline saved to {out}")
