"""The built-in demo: small FLUX-like and Wan-like DiTs (toy_model), their trained weights and the
calibrate -> schedule -> accelerated sampling demo. Not the algorithm: that is dpcache_core."""
