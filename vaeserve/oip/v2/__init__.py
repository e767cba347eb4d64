"""Generated from proto/vaeserve/oip/v2 by scripts/gen_proto.sh; never edited by hand."""
