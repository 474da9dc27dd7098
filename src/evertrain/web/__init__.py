"""What the dashboard and the model server share on a network: who may use them (access.py) and the HTTP server
with its limits (listener.py).

    evertrain dashboard DIR --host 0.0.0.0      # and: evertrain serve DIR --host 0.0.0.0
"""
