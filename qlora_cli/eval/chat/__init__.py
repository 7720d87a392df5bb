"""`qlora eval chat`: the QLoRA paper's chatbot evaluation (Vicuna and OpenAssistant benchmarks).

answer (benchmarks.py, answer.py) -> judge, both orders (judge.py) -> review files in FastChat's format
(reviews.py) -> relative scores and Elo (scores.py).
"""
