"""What a K2 model directory says, read without torch: the K2 config (`model_config`), the tokenizer and chat
template (`tokenizer`, `chat_template`, `templates/`), where a model source resolves to (`source`, `tiny`), and
the token-block hash that names prefix-cache blocks (`block_hash`). Router and worker planes both read these."""
