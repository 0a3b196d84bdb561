"""File names inside a Train checkpoint folder, shared by the worker that writes them and their readers."""

CKPT_META = "train_state.json"  # epoch, step, history, resumes
CKPT_WEIGHTS = "trainable.safetensors"  # the trainable part only (best: "best_" + this)
DS_TAG = "deepspeed"  # DeepSpeed's checkpoint tag (engine + optimizer state)
