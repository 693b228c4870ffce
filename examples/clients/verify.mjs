// How a downstream service verifies a Deputy token in Node and reads both principals.
//
//   npm install jose
//   node verify.mjs https://deputy.deputy-system.svc gdpr-compliance-service TOKEN
import { createRemoteJWKSet, jwtVerify } from "jose";

const [issuer, audience, token] = process.argv.slice(2);
const jwks = createRemoteJWKSet(new URL(`${issuer}/jwks.json`));

try {
  const { payload } = await jwtVerify(token, jwks, {
    issuer,
    audience,
    algorithms: ["EdDSA", "ES256"],
    typ: "at+jwt",
    clockTolerance: 30,
    requiredClaims: ["exp", "iat", "nbf", "sub", "act"],
  });
  const chain = [];
  for (let act = payload.act; act; act = act.act) chain.push(act.sub);
  console.log(`principal: ${payload.sub}`);
  console.log(`actor: ${chain[0]}`);
  for (const earlier of chain.slice(1)) console.log(`  on behalf of earlier actor: ${earlier}`);
  console.log(`scope: ${payload.scope}`);
} catch (e) {
  console.log(`invalid: ${e.message}`);
  process.exit(1);
}
