"""The benchmark and its helpers; bench/nginx_conf.py is shared with tests/integration."""
