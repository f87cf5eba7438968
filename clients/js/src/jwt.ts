/**
 * The `exp` claim (seconds since the epoch) of a token in the JWT compact form (three
 * base64url parts joined by dots), or undefined for any other token. The signature is
 * not checked: the node does that; the client only needs to know when to refresh.
 */
export function jwtExpiry(token: string): number | undefined {
  const parts = token.split('.');
  if (parts.length !== 3 || !parts.every((p) => /^[A-Za-z0-9_-]*$/.test(p))) return undefined;
  try {
    const claims = JSON.parse(base64UrlDecode(parts[1]!)) as unknown;
    if (claims === null || typeof claims !== 'object') return undefined;
    const exp = (claims as { exp?: unknown }).exp;
    return typeof exp === 'number' && Number.isFinite(exp) ? exp : undefined;
  } catch {
    return undefined;
  }
}

function base64UrlDecode(part: string): string {
  const b64 = part.replace(/-/g, '+').replace(/_/g, '/') + '='.repeat((4 - (part.length % 4)) % 4);
  const binary = atob(b64);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return new TextDecoder().decode(bytes);
}
