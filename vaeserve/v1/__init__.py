"""Generated from proto/vaeserve/v1 by scripts/gen_proto.sh; never edited by hand."""
