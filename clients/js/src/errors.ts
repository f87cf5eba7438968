import { ErrorCode } from './gen/meshd/fb/client.js';

/** The name of an error code (`ErrorCode[code]`), or the number as a string for codes not in the enum. */
export function errorCodeName(code: number): string {
  const name = (ErrorCode as unknown as Record<number, string | undefined>)[code];
  return name ?? String(code);
}

/** A request answered by the node with an Error frame. Branch on `code` (an `ErrorCode`), not on `message`. */
export class MeshError extends Error {
  readonly code: number;
  readonly codeName: string;
  readonly requestId: bigint;

  constructor(code: number, message: string, requestId: bigint = 0n) {
    super(message);
    this.name = 'MeshError';
    this.code = code;
    this.codeName = errorCodeName(code);
    this.requestId = requestId;
  }
}

/**
 * A request that could not be answered because the connection closed (or was never open, or
 * `close()` was called). `code` and `reason` are the WebSocket close code and reason, when known.
 */
export class ConnectionClosedError extends Error {
  readonly code?: number;
  readonly reason?: string;

  constructor(message = 'the connection is closed', code?: number, reason?: string) {
    super(message);
    this.name = 'ConnectionClosedError';
    this.code = code;
    this.reason = reason;
  }
}

/** A request that got no answer within `requestTimeout` seconds. */
export class RequestTimeoutError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'RequestTimeoutError';
  }
}
