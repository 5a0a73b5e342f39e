"""The reward service: the latent reward model and the curation scorers behind an HTTP API (`server`: the command,
`gateway` and `requests`: checking and decoding requests, `apis`: the LitServe workers), and the client trainers
use instead of loading the models (`client`)."""
