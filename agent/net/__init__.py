"""The data path on the host: addresses, routes and rules over netlink."""
