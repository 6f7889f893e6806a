"""The farm's HTTP service (FastAPI): tokens, the sample-root policy, idempotent submits, signed webhooks.
See `evalfarm.api.app`; the light client that speaks to it is `evalfarm.client`."""
