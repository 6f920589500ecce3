"""Official Duo / MDLM / AR checkpoints in and out (``duo-convert``): Lightning ``.ckpt`` and HF-export folders to
duo model folders and back (:mod:`.official`), a restricted unpickler (:mod:`.safe_pickle`), local GPT-2 / BERT
tokenizers (:mod:`.tokenizer`). Submodules are imported on use."""
