/** Format a Uuid struct (hi = bytes 0-7 big-endian, lo = bytes 8-15) as the lowercase 8-4-4-4-12 string. */
export function uuidToString(hi: bigint, lo: bigint): string {
  const hex = BigInt.asUintN(64, hi).toString(16).padStart(16, '0') + BigInt.asUintN(64, lo).toString(16).padStart(16, '0');
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

/** Parse a UUID string into the Uuid struct's `hi` and `lo`. */
export function uuidFromString(uuid: string): { hi: bigint; lo: bigint } {
  const hex = uuid.replace(/-/g, '');
  if (!/^[0-9a-fA-F]{32}$/.test(hex)) throw new TypeError(`not a UUID: ${uuid}`);
  return { hi: BigInt('0x' + hex.slice(0, 16)), lo: BigInt('0x' + hex.slice(16)) };
}
