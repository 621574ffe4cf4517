"""How a round's bytes sit inside a Flower message, in both directions.

``RecordDict({RECORD_NAME: ConfigRecord({PAYLOAD_KEY: <bytes>})})``. Kept free of imports:
every Flower message starts a fresh ClientApp process that imports this.
"""

RECORD_NAME = "fedrwe"
PAYLOAD_KEY = "payload"
