"""Generated from proto/vaeserve/oip by scripts/gen_proto.sh; never edited by hand."""
