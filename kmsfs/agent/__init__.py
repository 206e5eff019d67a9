"""kmsfs-hsmd: the HSM agent that alone holds HSM sessions and PINs, and its client."""
