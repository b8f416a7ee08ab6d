"""The teacher as a service: a teacher model in its own process (or on its own GPU / machine) that answers
trainers with its final hidden states (or top-k log-probs) instead of logits.

    python -m hybridlab.serve_teacher --model PATH [--host 127.0.0.1] [--port 8000] [--token-file F]

Modules: `protocol` (the binary frame both sides speak, the tokenizer fingerprint), `server` (the Starlette
application, the batching worker), `client` (`TeacherClient`: what the trainers use through `teacher_url`).
Training layer: imports the estimators and `hybridlab.train.loading`, never the teaching layer.
"""
