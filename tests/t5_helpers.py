# A tiny random T5 encoder and a word-level tokenizer written to a directory: a real local T5 without downloads.
import torch

WORDS = [
    "<pad>",
    "</s>",
    "<unk>",
    "a",
    "red",
    "green",
    "blue",
    "yellow",
    "purple",
    "white",
    "circle",
    "square",
    "triangle",
    "moving",
    "left",
    "right",
    "up",
    "down",
]


def make_tiny_t5(path, d_model: int = 16) -> None:
    import tokenizers
    import transformers

    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(path)
    cfg = transformers.T5Config(
        vocab_size=len(WORDS), d_model=d_model, d_kv=4, num_heads=2, num_layers=1, d_ff=32, decoder_start_token_id=0
    )
    torch.manual_seed(0)
    transformers.T5EncoderModel(cfg).save_pretrained(path, safe_serialization=True)
