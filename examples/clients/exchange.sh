#!/bin/sh
# How an agent exchanges its run token for a narrower token for one downstream call.
# Run inside the agent's pod: Deputy projects the files and sets the variables.
#   exchange.sh AUDIENCE [SCOPE...]
set -eu
audience=$1; shift
scope=${*:-}
dir=/var/run/secrets/deputy.dev
# Re-read the files on every use: Deputy rotates the run token, the kubelet the actor token.
curl -sS --fail-with-body "${DEPUTY_TOKEN_ENDPOINT}" \
  --data-urlencode "grant_type=urn:ietf:params:oauth:grant-type:token-exchange" \
  --data-urlencode "subject_token@${DEPUTY_TOKEN_FILE:-$dir/token}" \
  --data-urlencode "subject_token_type=urn:ietf:params:oauth:token-type:jwt" \
  --data-urlencode "actor_token@${DEPUTY_ACTOR_TOKEN_FILE:-$dir/actor-token}" \
  --data-urlencode "actor_token_type=urn:ietf:params:oauth:token-type:jwt" \
  --data-urlencode "audience=${audience}" \
  ${scope:+--data-urlencode "scope=${scope}"}
