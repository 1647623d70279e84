"""Hot standby of two boxes: keepalived moves the address, litestream carries the store, the node glues them."""
