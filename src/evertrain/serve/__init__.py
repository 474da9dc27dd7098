"""`evertrain serve`: an OpenAI-compatible API on the model a run is training, following it as files are accepted.

    evertrain serve WS                    # then: openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="-")

server.py puts it together; versions.py knows which model to serve and swaps to a newer one; engine.py generates
the answers; api.py speaks OpenAI's API; feedback.py keeps the answers and turns the feedback on them into
files for the daemon to train (--collect-feedback).
"""
